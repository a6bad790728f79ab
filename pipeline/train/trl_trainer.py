"""TRL integration: TRL's `SFTTrainer` trained from a kdcache store with kdcache's losses.

Chat models are usually fine-tuned with TRL's `SFTTrainer`; it has no offline teacher. The
store already holds what SFTTrainer would build: rows rendered with the chat template and
tokenized at capture, and on a chat store a `loss_mask` over the assistant's tokens (the
counterpart of TRL's `assistant_only_loss`). So `KDSFTTrainer` is `SFTTrainer` (its `SFTConfig`,
logging, callbacks, checkpoints, Accelerate handling) with:

* the rows the student sees taken from the store, not tokenized again: TRL's dataset
  preparation is skipped (`dataset_kwargs={"skip_prepare_dataset": True}`);
* the loss `KDTrainer`'s (`compute_loss` is inherited: one loss code for both trainers), with
  a chat store's `loss_mask` deciding which positions count;
* two dataset shapes: a `StoreRows` (the store in `KDStream` order, split per rank, exact
  resume: see `store_rows`), or TRL's own `datasets.Dataset` with a `sample_id` column (the rows
  TRL's tools picked, filtered or mixed), joined to the store by sample id per batch. Every id
  (and the `input_ids`, where the dataset has them) is checked against the store before the
  first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from kdstore.errors import StoreMismatchError
from kdstore.reader import StoreReader
from pipeline.config import ConfigError
from pipeline.train.hf_trainer import KDTrainer
from pipeline.train.store_rows import StoreRows

SAMPLE_ID = "sample_id"


class SampleIdCollator:
    """Rows of TRL's dataset (with `sample_id`) → the store's batch for those ids, in that order."""

    def __init__(self, reader: StoreReader, fields: Sequence[str]):
        self.reader = reader
        mask = ["loss_mask"] if reader.spec.loss_mask else []
        self.fields = list(dict.fromkeys(["sample_id", "input_ids", "valid", *mask, *fields]))

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        data = self.reader.read_samples([int(r[SAMPLE_ID]) for r in rows], self.fields)
        return {k: v.tolist() if v.dtype == object else torch.from_numpy(np.ascontiguousarray(v))
                for k, v in data.items()}


def check_sample_ids(dataset: Any, reader: StoreReader) -> None:
    """One-line error unless every row of `dataset` names a sample id of the store (and, where the
    dataset has `input_ids`, the store's tokens for it)."""
    from datasets import Dataset

    url = reader.location.url
    if not isinstance(dataset, Dataset):
        raise StoreMismatchError(f"TRL train_dataset is a {type(dataset).__name__}: pass StoreRows(store, fields) or "
                                 f"a map-style datasets.Dataset with the store's {SAMPLE_ID!r} column")
    columns = list(dataset.column_names or [])
    if SAMPLE_ID not in columns:
        raise StoreMismatchError(f"TRL dataset has no {SAMPLE_ID!r} column (columns {columns}): its rows cannot be "
                                 f"joined to store {url!r}; add the store's sample ids or pass StoreRows")
    ids = np.asarray(dataset[SAMPLE_ID], dtype=np.int64)
    known = np.isin(ids, reader.sample_ids())
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise StoreMismatchError(f"TRL dataset row {row}: sample_id {int(ids[row])} is not in store {url!r} "
                                 f"({int((~known).sum())} of {len(ids)} rows unmatched)")
    if "input_ids" in columns:
        stored = reader.read_samples(ids, ["input_ids"])["input_ids"]
        for row, tokens in enumerate(dataset["input_ids"]):
            if not np.array_equal(np.asarray(tokens), stored[row]):
                raise StoreMismatchError(f"TRL dataset row {row}: input_ids differ from store {url!r}'s row for "
                                         f"sample_id {int(ids[row])}: the dataset was tokenized differently")


def _sft_config(args: Any) -> SFTConfig:
    if not isinstance(args, SFTConfig):
        if args is None:
            raise ConfigError("KDSFTTrainer needs args (an SFTConfig or TrainingArguments with output_dir)")
        values = args.to_dict()
        values["hub_token"] = args.hub_token
        args = SFTConfig(**values)
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}  # rows are the store's
    args.remove_unused_columns = False
    return args


class KDSFTTrainer(KDTrainer, SFTTrainer):
    """`trl.SFTTrainer` with kdcache's loss from a store (see the module doc).

    `KDSFTTrainer(model=student, args=SFTConfig(...), train_dataset=StoreRows(store, fields) or a
    datasets.Dataset with sample_id, processing_class=tokenizer, kd_store=store,
    kd_losses=[{"name": "fkl"}, {"name": "ce", "weight": 0.1}])`. `model` is a loaded model.
    """

    def __init__(self, model: Any, args: Any = None, train_dataset: Any = None, *, kd_store: str | StoreReader,
                 kd_losses: Any, processing_class: Any = None, **kwargs: Any):
        reader = kd_store if isinstance(kd_store, StoreReader) else StoreReader(kd_store)
        if processing_class is None:
            raise ConfigError("KDSFTTrainer needs processing_class= the student's tokenizer (the store's)")
        rows = None
        if isinstance(train_dataset, StoreRows):
            if train_dataset.reader.fingerprint != reader.fingerprint:
                raise StoreMismatchError(f"train_dataset reads store {train_dataset.reader.location.url!r}, "
                                         f"kd_store is {reader.location.url!r}: they must be the same store")
            rows, train_dataset = train_dataset, train_dataset.hf_dataset()  # what TRL's checks take
        elif train_dataset is not None:
            check_sample_ids(train_dataset, reader)
        super().__init__(model=model, args=_sft_config(args), train_dataset=train_dataset,
                         processing_class=processing_class, kd_store=reader, kd_losses=kd_losses, **kwargs)
        if rows is not None:
            self.train_dataset = rows  # streamed per rank by StoreRowsMixin
        elif "data_collator" not in kwargs:
            self.data_collator = SampleIdCollator(reader, self.kd.fields)
