"""Hugging Face integration: train any HF causal LM from a kdcache store with `transformers.Trainer`.

Users already train with `transformers.Trainer` (and TRL / Accelerate on top of it); none of them
reads cached teacher signals. Three pieces make a store usable there, with kdcache's own losses
(the same registry `build_loss`, the same field check `check_fields` before the first step):

* `StoreRows` — a store's rows as a `datasets`-style iterable dataset: a torch
  `IterableDataset` of one dict per row (`sample_id`, `input_ids` [T], `valid` [T] and the
  fields the losses read: `topk_ids` [T, k], `topk_logp` [T, k], `topk_tail` [T],
  `hidden_<L>` [T, d], ...), in `KDStream`'s order (seeded shard shuffle, bounded row buffer),
  so it is the same row sequence kdcache's trainer sees. `hf_dataset()` wraps the same rows as
  a `datasets.IterableDataset` (for `.map`, `.take`, interleaving) — note that `datasets`
  formats upcast float16/int32, so the torch one is the compact path.
* `KDCollator` — stacks rows into the batch the losses take (text fields stay lists).
* `KDTrainer` — a `transformers.Trainer` whose `compute_loss` runs the student and the kdcache
  losses through the training core (`pipeline.train.core`, shared with `kdcache train`): the
  same input checks, the same batch preparation (a chat store's `loss_mask` folded, so only the
  assistant's tokens train), fused output losses (last hidden state + head, no whole logits)
  whenever `kdcache train` would fuse, `fused_loss=False` to turn them off. The losses' own
  parameters (projections) join the optimizer as a second group; the components (`fkl`, `ce`,
  ...) are read from the device only when the Trainer logs, and logged next to the loss.
  It sets `remove_unused_columns=False` itself: the batch carries store fields the model's
  forward does not take.

Under Accelerate / several processes, `KDTrainer` streams each rank's own part of a `StoreRows`
dataset and saves the stream position with every checkpoint (`StoreRowsMixin`, in
`pipeline/train/store_rows.py`, where `StoreRows` and `KDCollator` live). TRL's `SFTTrainer`
with the same loss is `pipeline.train.trl_trainer.KDSFTTrainer`.
Not supported here (use `kdcache train`): losses with their own optimizer (adversarial) and
cross-tokenizer students, refused before the first step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer

from kdstore.reader import StoreReader
from pipeline.config import ConfigError
from pipeline.train.core import (
    DeviceMeter,
    HiddenThrough,
    build_kd,
    check_steps,
    fused_forward,
    open_stores,
    prepare_batch,
    student_outputs,
)
from pipeline.train.store_rows import KDCollator, StoreRows, StoreRowsMixin

__all__ = ["KDCollator", "KDTrainer", "StoreRows", "kd_fields"]


class KDTrainer(StoreRowsMixin, Trainer):
    """`transformers.Trainer` with kdcache's losses from a store (see the module doc).

    `KDTrainer(model=..., args=TrainingArguments(...), kd_store=store, kd_losses=[{"name": "fkl"},
    {"name": "ce", "weight": 0.1}])` reads the store's rows itself (`StoreRows`, seeded with
    `args.seed`); a `train_dataset` given instead must read `kd_fields(...)`. The collator defaults
    to `KDCollator`. `kd_extra_stores`: the stores of teachers 1..n (a `multi_teacher` loss).
    `fused_loss=False` computes whole logits (as `TrainConfig.fused_loss`). `kd_epochs`: refuse a
    `max_steps` that would read the store more than this many times (None: cycle, as HF does).
    """

    def __init__(self, *args: Any, kd_store: str | StoreReader, kd_losses: Any,
                 kd_extra_stores: Sequence[str | StoreReader] = (), fused_loss: bool = True,
                 kd_epochs: int | None = None, **kwargs: Any):
        given = dict(inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments)
        model = given.get("model")
        if model is None:
            raise ConfigError(f"{type(self).__name__} needs model=: the KD losses, their store fields and the fused "
                              "head are built from the student before training (model_init is not supported)")
        readers = open_stores(kd_store, kd_extra_stores)
        tokenizer = given.get("processing_class")
        self.kd = build_kd(kd_losses, readers, model, tokenizer if hasattr(tokenizer, "get_vocab") else None,
                           fused_loss=fused_loss, allow_auxiliary=False, allow_cross=False)
        dataset = given.get("train_dataset")
        if dataset is None:
            given["train_dataset"] = dataset = StoreRows(readers[0], self.kd.fields, joined=readers[1:],
                                                         seed=getattr(given.get("args"), "seed", 42))  # HF's default
        if isinstance(dataset, StoreRows) and (missing := sorted(set(self.kd.fields) - set(dataset.fields))):
            raise ConfigError(f"train_dataset reads no {missing} from store {readers[0].location.url!r}, which these "
                              "losses and store need: build it as StoreRows(store, kd_fields(store, losses, model))")
        if given.get("data_collator") is None:
            given["data_collator"] = KDCollator()
        super().__init__(**given)
        self.args.remove_unused_columns = False  # store fields are not forward() arguments
        # our loss is a per-micro-batch mean: let the Trainer divide by gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        self.kd.loss.to(self.args.device)
        if self.args.max_steps > 0:
            per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            check_steps(readers[0].num_rows(), self.args.max_steps, per_step * self.args.world_size, kd_epochs,
                        f"store {readers[0].location.url!r}")
        self.kd_meter = DeviceMeter()  # per training micro-batch: loss + components, read when logging
        self._kd_records: list[dict[str, float]] = []
        self._kd_ids: list[list[int]] = []
        self._kd_window: list[dict[str, float]] = []
        self._kd_hidden: Any = None

    @property
    def kd_history(self) -> list[dict[str, float]]:
        """One entry per training micro-batch: the loss and its components (read now)."""
        self._kd_read()
        return self._kd_records

    @property
    def kd_sample_ids(self) -> list[list[int]]:
        """The sample ids of each training micro-batch, in `kd_history`'s order."""
        self._kd_read()
        return self._kd_ids

    def _kd_read(self) -> None:
        for record, ids in self.kd_meter.read():  # raises NonFiniteLossError naming the micro-batch
            self._kd_records.append(record)
            self._kd_ids.append(ids)
            self._kd_window.append(record)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        own = [p for p in self.kd.loss.parameters() if p.requires_grad]
        if own and not any(p is q for g in optimizer.param_groups for p in g["params"] for q in own):
            optimizer.add_param_group({"params": own, "weight_decay": self.args.weight_decay})
        return optimizer

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.kd.readers[0].spec.loss_mask and "loss_mask" not in inputs:
            raise ConfigError(f"store {self.kd.readers[0].location.url!r} is a chat store but this batch has no "
                              "loss_mask: read it (kd_fields names it) so only the assistant's tokens train")
        prepared = prepare_batch(inputs, self.args.device)
        batch = prepared.batch
        unwrapped = self.accelerator.unwrap_model(model)
        forward = model
        if self.kd.fused:  # built once per model (and wrapper), not per step
            if self._kd_hidden is None or self._kd_hidden[0] is not model:
                self._kd_hidden = (model, fused_forward(unwrapped) if model is unwrapped
                                   else HiddenThrough(model, unwrapped))
            forward = self._kd_hidden[1]
        student = student_outputs(self.kd, forward, unwrapped, batch["input_ids"])
        result = self.kd.loss(student, batch)
        if model.training:
            self.kd_meter.add({"loss": result.total, **result.components})
            self.kd_meter.end_step({}, prepared.sample_ids)
            if len(self.kd_meter.pending) >= 1024:  # no logging for a long while: read, to bound what is held
                self._kd_read()
        return (result.total, student) if return_outputs else result.total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each loss component since the last log (`kd/fkl`, `kd/ce`, ...): the
        values are read from the device here, at logging steps only (finiteness checked then)."""
        self._kd_read()
        if "loss" in logs and self._kd_window:
            names = [k for k in self._kd_window[0] if k != "loss"]
            logs.update({f"kd/{k}": sum(r[k] for r in self._kd_window) / len(self._kd_window) for k in names})
            self._kd_window = []
        super().log(logs, *args, **kwargs)


def kd_fields(store: str | StoreReader, losses: Any, model: Any, extra_stores: Sequence[str | StoreReader] = ()
              ) -> list[str]:
    """The store fields a `StoreRows` dataset must read for these losses (with input_ids, valid,
    and a chat store's loss_mask)."""
    return list(build_kd(losses, open_stores(store, extra_stores), model, allow_auxiliary=False,
                         allow_cross=False).fields)
