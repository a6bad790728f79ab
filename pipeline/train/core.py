"""The training core every trainer shares: kdcache's own `Trainer`, the Hugging Face `KDTrainer`
and the TRL integration call these, so a store trains the same way whichever loop drives it.

* `build_kd` — checks the input (stores aligned, chat masks, the losses' fields, the student's
  tokenizer, losses the caller cannot step) and builds the loss, the store fields to read and
  whether the output losses run fused (last hidden state + head, no whole `[tokens, V]` logits).
* `prepare_batch` — a `KDStream` / `StoreRows` batch → what the losses take: re-tokenised where
  the student has its own tokenizer, host-side counts (tokens, sample ids) read before the
  device move, moved (non_blocking), the chat `loss_mask` folded into `target_mask`.
  Multi-teacher batches carry teacher i's fields as `t<i>/<field>` (the stream joins them; the
  loss takes its per-teacher views).
* `student_outputs` — the student's forward as `StudentOutputs`: fused, the last hidden state
  and the head; otherwise the logits (and hidden states / attentions where a loss reads them).
* `DeviceMeter` — loss components kept on the device and read on the host only when a trainer
  logs: a step makes no host-device sync. The finiteness check runs at that read and names the
  step and its sample ids.
* `check_steps` — the steps a run asks for against the rows the store has, when epochs are capped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdstore.join import check_aligned
from kdstore.reader import StoreReader
from kdstore.torch_stream import POSITION_KEY, WORKER_KEY
from pipeline.capture.model_head import LastHidden, fusable_head
from pipeline.config import ConfigError
from pipeline.train.cross_tokenizer import STORE_FIELDS, Retokenizer, retokenizer
from pipeline.train.losses import (
    LossConfigError,
    NonFiniteLossError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    auxiliary_losses,
    build_loss,
    check_cross_tokenizer,
    check_fields,
    fold_loss_mask,
    required_fields,
)
from pipeline.train.student import check_tokenizer

__all__ = ["DeviceMeter", "HiddenThrough", "KDSetup", "Prepared", "build_kd", "check_kd_input", "check_steps", "fused_forward",
           "open_stores", "prepare_batch", "student_outputs"]


def open_stores(store: str | StoreReader, extra: Sequence[str | StoreReader] = ()) -> list[StoreReader]:
    """The primary store and the stores of teachers 1..n, as readers."""
    return [s if isinstance(s, StoreReader) else StoreReader(s) for s in (store, *extra)]


def check_kd_input(losses: Any, readers: Sequence[StoreReader], *, cross: bool) -> StoreInfo:
    """Everything about the stores and losses that can be checked before a student exists: joined
    stores line up, a chat mask can reach every loss, every loss finds its fields."""
    reader, extra = readers[0], list(readers[1:])
    check_aligned(list(readers))
    check_loss_masks(reader, extra, cross)
    info = StoreInfo.joined(list(readers))
    check_fields(losses, info.field_names)
    return info


def needs_attentions(losses: Any, info: StoreInfo) -> bool:
    """Whether a loss reads the teacher's attention maps (the student must run eager attention)."""
    return any(f.startswith("attn_") for f in required_fields(losses, info.field_names))


@dataclass(frozen=True, eq=False)
class KDSetup:
    """What a trainer needs to take KD steps from a store: built by `build_kd`."""

    loss: nn.Module  # the configured losses (a KDLoss; its parameters join the optimizer)
    fields: tuple[str, ...]  # the store fields each batch must carry
    fused: bool  # output losses from the last hidden state + head (no whole logits)
    readers: tuple[StoreReader, ...]  # the primary store, then the joined ones
    retokenize: Retokenizer | None = None  # a student with its own tokenizer: rows re-tokenised per batch
    aux_losses: tuple[Any, ...] = ()  # losses with an optimizer of their own (adversarial)
    why_not_fused: str | None = None  # set when fused_loss was asked for and could not be honoured

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.loss.needs)


def build_kd(losses: Any, store: str | StoreReader | Sequence[StoreReader], model: Any, tokenizer: Any = None, *,
             info: StoreInfo | None = None, cross: bool = False, fused_loss: bool = True, can_fuse: bool = True,
             allow_auxiliary: bool = True, allow_cross: bool = True, online: bool = False, student_row_length: int | None = None,
             device: torch.device | str | None = None) -> KDSetup:
    """The loss for `model` on the store(s), the fields to stream, fused or not.

    `cross`: the student has its own tokenizer (rows re-tokenised); otherwise a given `tokenizer`
    must be the store's. `allow_auxiliary=False`: the caller cannot step a loss's own optimizer.
    `allow_cross=False`: the caller cannot re-tokenise rows (cross-tokenizer losses refused).
    `can_fuse=False`: the caller's head is sharded or wrapped (FSDP). `online`: the fields come
    from a resident teacher, the store gives input_ids and valid only.
    """
    readers = open_stores(store) if isinstance(store, str | StoreReader) else list(store)
    if info is None:
        cross = check_cross_tokenizer(losses, cross)
        if cross and not allow_cross:
            raise LossConfigError("cross-tokenizer losses re-tokenise the store per batch: train them with "
                                  "`kdcache train`")
        info = check_kd_input(losses, readers, cross=cross)
    if tokenizer is not None and not cross:
        check_tokenizer(tokenizer, readers[0], getattr(model.config, "_name_or_path", "") or type(model).__name__)
    loss = build_loss(losses, info, StudentDims.from_config(model.config, tokenizer if cross else None))
    if device is not None:
        loss = loss.to(device)
    aux = auxiliary_losses(loss)
    if aux and not allow_auxiliary:
        raise LossConfigError(f"loss {type(aux[0]).__name__} (adversarial) trains a discriminator with an optimizer "
                              "of its own, which this trainer cannot step: train it with `kdcache train`")
    fields = set(loss.fields) | {"input_ids", "valid"} | (set(STORE_FIELDS) if cross else set())
    if online:
        fields = {"input_ids", "valid", "doc_ids"}
    if readers[0].spec.loss_mask:  # a chat store: every loss counts the assistant's tokens only
        fields.add("loss_mask")
    retok = retokenizer(tokenizer, readers[0], student_row_length) if cross else None
    fused, why = False, None
    if fused_loss and loss.fusable and not aux and not (loss.needs - {"logits", "output_head"}):
        why = "the head is sharded" if not can_fuse else fusable_head(model, getattr(model.config, "vocab_size", None))
        fused = why is None
    return KDSetup(loss, tuple(sorted(fields)), fused, tuple(readers), retok, tuple(aux), why)


def check_loss_masks(reader: StoreReader, extra: Sequence[StoreReader], cross: bool) -> None:
    """A chat store's loss mask reaches every loss through the primary store's rows; refuse what
    cannot honour it: a student with another tokenizer (its re-tokenised rows carry no mask), or
    a join of stores that disagree on having one."""
    if not reader.spec.loss_mask:
        if masked := [r.location.url for r in extra if r.spec.loss_mask]:
            raise ConfigError(f"store {masked[0]!r} has a chat loss_mask but the primary store {reader.location.url!r} "
                              "has none: list the chat store first so its mask applies to every teacher")
        return
    if cross:
        raise ConfigError(f"store {reader.location.url!r} is a chat store (a loss_mask over assistant tokens): a student "
                          "with its own tokenizer cannot carry that mask over; use the teacher's tokenizer")


def check_steps(rows: int, steps: int, rows_per_step: int, epochs: int | None, where: str) -> None:
    """With `epochs` set, a run reads the store's rows at most that many times: refuse a step count
    that would need more (before the first step). `epochs=None` cycles the store as often as needed."""
    if epochs is None:
        return
    if rows * epochs < steps * rows_per_step:
        most = rows * epochs // rows_per_step
        raise ConfigError(f"{steps} steps × {rows_per_step} rows per step need {steps * rows_per_step} rows, but "
                          f"{where} has {rows} rows × {epochs} epoch(s) = {rows * epochs}: at most {most} steps, "
                          "or allow more epochs")


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class Prepared:
    """One batch as the losses take it, with what the host knew of it before the device move."""

    batch: dict[str, Any]  # on the device, loss mask folded into target_mask
    # valid tokens (the student's, after any re-tokenisation) and sample ids, counted on the host from
    # a CPU batch; a batch already on the device (Accelerate places them) keeps them as device tensors
    tokens: int | Tensor
    sample_ids: list[int] | Tensor
    truncated_tokens: int = 0  # student tokens cut by re-tokenisation


def prepare_batch(batch: Mapping[str, Any], device: torch.device | str, retokenize: Retokenizer | None = None
                  ) -> Prepared:
    """A `KDStream` or `KDCollator` batch (tensors; text fields as lists) → `Prepared`."""
    batch = {k: v for k, v in batch.items() if k not in (WORKER_KEY, POSITION_KEY)}
    truncated = 0
    if retokenize is not None:
        batch = retokenize(batch)
        truncated = int(batch.pop("truncated_tokens"))
    valid, ids = batch["valid"], batch.get("sample_id")
    on_host = valid.device.type == "cpu"
    # host-side counts from the CPU tensors (numpy views): no device sync
    tokens = int(valid.numpy().sum()) if on_host else valid.sum()
    if isinstance(ids, Tensor):
        sample_ids = ids.numpy().tolist() if ids.device.type == "cpu" else ids.detach()
    else:
        sample_ids = list(ids) if ids is not None else []
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return Prepared(fold_loss_mask(moved), tokens, sample_ids, truncated)


# ---------------------------------------------------------------- the student's forward


def fused_forward(model: nn.Module) -> nn.Module:
    """The module a fused step calls for the last hidden state (wrap it in DDP / compile as needed)."""
    return LastHidden(model)


class HiddenThrough(nn.Module):
    """The last hidden state through a wrapper built around the whole causal LM (Accelerate's DDP):
    the call goes through the wrapper, so it syncs gradients, with the LM's head swapped for an
    identity for the call; the fused losses then apply the real head chunk by chunk."""

    def __init__(self, wrapper: nn.Module, model: nn.Module):
        super().__init__()
        self.wrapper, self.inner = wrapper, [model]  # a list: not registered twice as a submodule

    def forward(self, input_ids: Tensor) -> Tensor:
        model = self.inner[0]
        head = model.get_output_embeddings()
        model.set_output_embeddings(nn.Identity())
        try:
            return self.wrapper(input_ids=input_ids, use_cache=False).logits
        finally:
            model.set_output_embeddings(head)


def student_outputs(setup: KDSetup, forward: Any, model: Any, input_ids: Tensor) -> StudentOutputs:
    """The student's outputs for the losses. `model` is the causal LM (its head is read here);
    `forward` what to call: with `setup.fused`, `fused_forward(model)` (or a wrapper of it) giving
    the last hidden state, else the model (or its DDP / Accelerate wrapper)."""
    head = model.get_output_embeddings().weight
    if setup.fused:  # no [tokens, V] logits: the losses apply the head chunk by chunk
        return StudentOutputs(None, output_head=head, last_hidden=forward(input_ids))
    needs = setup.needs
    out = forward(input_ids=input_ids, output_hidden_states="hidden_states" in needs,
                  output_attentions="attentions" in needs, use_cache=False)
    return StudentOutputs(out.logits, out.hidden_states, out.attentions, head)


# ---------------------------------------------------------------- logged values, read late


@dataclass
class _Pending:
    info: dict[str, Any]
    values: dict[str, Tensor]
    sample_ids: list[int] | Tensor


@dataclass
class DeviceMeter:
    """Loss components summed on the device per step; `read()` fetches every pending step's in one
    transfer (the only sync) and raises `NonFiniteLossError` for the first non-finite one, naming
    its step (`info["step"]`, or its position) and sample ids."""

    pending: list[_Pending] = field(default_factory=list)
    _current: dict[str, Tensor] = field(default_factory=dict)

    def add(self, values: Mapping[str, Tensor | float], scale: float = 1.0) -> None:
        """Add `values` × `scale` to the step being taken (detached; floats stay on the host)."""
        for name, value in values.items():
            v = value.detach().float().reshape(()) if isinstance(value, Tensor) else float(value)
            v = v * scale if scale != 1.0 else v
            self._current[name] = self._current[name] + v if name in self._current else v

    def end_step(self, info: dict[str, Any], sample_ids: list[int] | Tensor) -> dict[str, Tensor]:
        """Close the step: `info` (host values: step, lr, tokens...) is kept next to its values."""
        values, self._current = self._current, {}
        self.pending.append(_Pending(info, values, sample_ids))
        return values

    def read(self) -> list[tuple[dict[str, Any], list[int]]]:
        """Every pending step as (record: info + component floats, sample ids), oldest first."""
        pending, self.pending = self.pending, []
        device_values = [v for p in pending for v in p.values.values() if isinstance(v, Tensor)]
        host = iter(torch.stack(device_values).tolist()) if device_values else iter(())  # the one sync
        out = []
        for i, p in enumerate(pending):
            if isinstance(p.sample_ids, Tensor):
                p.sample_ids = p.sample_ids.tolist()
            values = {k: next(host) if isinstance(v, Tensor) else v for k, v in p.values.items()}
            bad = [f"{k}={v:g}" for k, v in values.items() if not math.isfinite(v)]
            if bad:
                where = p.info.get("step", i + 1)
                first = pending[0].info.get("step", 1)
                raise NonFiniteLossError(
                    f"step {where} (of steps {first}-{pending[-1].info.get('step', len(pending))} read together): loss "
                    f"component(s) not finite: {', '.join(bad)}; batch with sample ids {p.sample_ids}")
            out.append(({**p.info, **values}, p.sample_ids))
        return out
