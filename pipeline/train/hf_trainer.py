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
  losses; the losses' own parameters (projections) join the optimizer as a second group, and
  the components (`fkl`, `ce`, ...) are logged next to the loss. Give it
  `TrainingArguments(remove_unused_columns=False, ...)`-compatible arguments (it sets that
  itself): the batch carries store fields the model's forward does not take.

Under Accelerate / several processes, `StoreRows` is one stream (rank 0 of 1) and Accelerate
shards or dispatches its batches; kdcache's own trainer splits the store by rank instead.
Not supported here (use `kdcache train`): losses with their own optimizer (adversarial),
cross-tokenizer students, extra stores of other teachers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import Trainer

from kdstore.reader import StoreReader
from kdstore.torch_stream import POSITION_KEY, SKIPPED_KEY, WORKER_KEY, KDStream
from pipeline.train.losses import (
    LossConfigError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    auxiliary_losses,
    build_loss,
    check_cross_tokenizer,
    check_fields,
    check_finite,
)


class StoreRows(IterableDataset):
    """The rows of a store, one dict of tensors per row, in `KDStream` order (see the module doc)."""

    def __init__(self, store: str | StoreReader, fields: Sequence[str], *, seed: int = 0, shuffle: bool = True,
                 buffer_rows: int = 256, block_rows: int = 64, on_corrupt: str = "raise"):
        super().__init__()
        names = list(dict.fromkeys(["input_ids", "valid", *fields]))
        # rows are decoded block_rows at a time; the order does not depend on the block size
        self.stream = KDStream(store, names, block_rows, seed=seed, shuffle=shuffle, buffer_rows=buffer_rows,
                               rank=0, world_size=1, on_corrupt=on_corrupt)

    @property
    def fields(self) -> list[str]:
        return list(self.stream.fields)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for block in self.stream:
            block.pop(WORKER_KEY, None)
            block.pop(POSITION_KEY, None)
            block.pop(SKIPPED_KEY, None)
            if "sample_id" not in block:  # a worker's skip report, no rows
                continue
            for i in range(len(block["sample_id"])):
                yield {name: value[i] for name, value in block.items()}

    def hf_dataset(self) -> Any:
        """The same rows as a `datasets.IterableDataset` (values as numpy arrays and lists)."""
        from datasets import IterableDataset as HFIterableDataset

        def rows() -> Iterator[dict[str, Any]]:
            for row in self:
                yield {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in row.items()}

        return HFIterableDataset.from_generator(rows)


class KDCollator:
    """Rows (dicts) → one batch: tensors stacked on a new leading axis, anything else (text) listed."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in rows[0]:
            values = [row[name] for row in rows]
            if isinstance(values[0], torch.Tensor):
                out[name] = torch.stack(values)
            elif hasattr(values[0], "shape"):  # numpy rows from hf_dataset()
                out[name] = torch.stack([torch.as_tensor(v) for v in values])
            else:
                out[name] = values
        return out


def kd_loss_for(losses: Any, store: str | StoreReader, model: Any, tokenizer: Any = None) -> torch.nn.Module:
    """kdcache's loss for `model` on `store`: fields checked first, then built by the registry."""
    reader = store if isinstance(store, StoreReader) else StoreReader(store)
    info = StoreInfo.joined([reader])
    check_fields(losses, info.field_names)
    if check_cross_tokenizer(losses, False):
        raise LossConfigError("cross-tokenizer losses re-tokenise the store per batch: train them with `kdcache train`")
    loss = build_loss(losses, info, StudentDims.from_config(model.config, tokenizer))
    if auxiliary_losses(loss):
        raise LossConfigError("losses with an optimizer of their own (adversarial) need kdcache's trainer "
                              "(`kdcache train`), not KDTrainer")
    return loss


class KDTrainer(Trainer):
    """`transformers.Trainer` with kdcache's losses from a store (see the module doc).

    `KDTrainer(model=..., args=TrainingArguments(...), train_dataset=StoreRows(store, trainer_fields),
    kd_store=store, kd_losses=[{"name": "fkl"}, {"name": "ce", "weight": 0.1}])`; the collator
    defaults to `KDCollator`. `kd_fields(store, losses, model)` names the fields `StoreRows` must read.
    """

    def __init__(self, *args: Any, kd_store: str | StoreReader, kd_losses: Any, **kwargs: Any):
        model = kwargs.get("model") if "model" in kwargs else args[0]
        self.kd_loss = kd_loss_for(kd_losses, kd_store, model, kwargs.get("processing_class"))
        kwargs.setdefault("data_collator", KDCollator())
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # store fields are not forward() arguments
        # our loss is a per-micro-batch mean: let the Trainer divide by gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        self.kd_loss.to(self.args.device)
        self.kd_history: list[dict[str, float]] = []  # one entry per training micro-batch: loss + components
        self.kd_sample_ids: list[list[int]] = []  # and the sample ids of that micro-batch
        self._kd_window: dict[str, list[float]] = {}

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        own = [p for p in self.kd_loss.parameters() if p.requires_grad]
        if own and not any(p is q for g in optimizer.param_groups for p in g["params"] for q in own):
            optimizer.add_param_group({"params": own, "weight_decay": self.args.weight_decay})
        return optimizer

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        needs = self.kd_loss.needs
        out = model(input_ids=inputs["input_ids"], output_hidden_states="hidden_states" in needs,
                    output_attentions="attentions" in needs, use_cache=False)
        head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        result = self.kd_loss(StudentOutputs(out.logits, out.hidden_states, out.attentions, head), inputs)
        check_finite(result, inputs)
        if model.training:
            record = {"loss": float(result.total.detach()), **{k: float(v) for k, v in result.components.items()}}
            self.kd_history.append(record)
            self.kd_sample_ids.append([int(i) for i in inputs["sample_id"]])
            for k, v in record.items():
                self._kd_window.setdefault(k, []).append(v)
        return (result.total, out) if return_outputs else result.total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each loss component since the last log (`kd/fkl`, `kd/ce`, ...)."""
        if "loss" in logs and self._kd_window:
            logs.update({f"kd/{k}": sum(v) / len(v) for k, v in self._kd_window.items() if k != "loss"})
            self._kd_window = {}
        super().log(logs, *args, **kwargs)


def kd_fields(store: str | StoreReader, losses: Any, model: Any) -> list[str]:
    """The store fields a `StoreRows` dataset must read for these losses (plus input_ids, valid)."""
    loss = kd_loss_for(losses, store, model)
    return sorted(set(loss.fields) | {"input_ids", "valid"})
