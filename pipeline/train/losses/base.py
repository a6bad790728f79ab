"""What every loss shares: the student's outputs, the result, masks, reduction and errors.

A loss is an `nn.Module` (so the projections some losses own reach the optimizer through
`loss.parameters()`) whose `forward(student, batch)` returns a `LossResult`. It declares the store
fields it reads (`fields`) and what it needs from the student's forward pass (`needs`), so the
trainer can check the store and ask the model for hidden states or attentions only when needed.

Reduction, everywhere: a per-position value is averaged over the positions that count (token
level, `masked_mean`), so a batch's loss does not depend on how much padding it holds, and a
batch without any such position gives exactly 0 with zero (finite) gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError


class LossConfigError(ConfigError):
    """A loss config cannot be built (bad value, unknown name, mismatch with the store)."""


class UnknownLossError(LossConfigError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MissingLossFieldError(LossConfigError, KeyError):
    """A loss needs a store field the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(FloatingPointError):
    """A loss component went NaN or infinite; the message names it and the batch's sample ids."""


@dataclass(frozen=True)
class StudentOutputs:
    """What the student's forward pass hands to the losses.

    logits [B,T,V] (any float dtype; losses compute in float32, float64 stays float64);
    hidden_states: HF convention, a tuple of num_layers + 1 tensors [B,T,d] (0 = embeddings);
    attentions: HF convention, a tuple of num_layers tensors [B,H,T,T] (probabilities);
    output_head: the student's output embedding weight [V,d] (dual-space KD, fused losses);
    last_hidden: the last hidden state [B,T,d] (what the head reads). With logits None and
    last_hidden + output_head given, the output losses run fused (`fused`): logits chunk by chunk,
    never whole. Only losses with `fusable` take such outputs.
    """

    logits: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    output_head: Tensor | None = None
    last_hidden: Tensor | None = None


@dataclass(frozen=True)
class LossResult:
    """`total`: the scalar to back-propagate (weights applied). `components`: unweighted
    per-loss values, detached, for logging (e.g. {"fkl": ..., "hidden_mse": ...})."""

    total: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StudentDims:
    """The student's sizes that alignment losses need when they are built (before any forward)."""

    num_layers: int
    hidden_size: int
    num_heads: int | None = None
    vocab_size: int | None = None
    tokenizer: Any = None  # cross-tokenizer losses map the teacher's vocabulary onto this one

    @classmethod
    def from_config(cls, config: object, tokenizer: Any = None) -> StudentDims:
        """From a transformers `PretrainedConfig` (num_hidden_layers, hidden_size, num_attention_heads)."""
        return cls(
            num_layers=int(config.num_hidden_layers),  # type: ignore[attr-defined]
            hidden_size=int(config.hidden_size),  # type: ignore[attr-defined]
            num_heads=getattr(config, "num_attention_heads", None),
            vocab_size=getattr(config, "vocab_size", None),
            tokenizer=tokenizer,
        )

    @staticmethod
    def required(student: StudentDims | None, label: str) -> StudentDims:
        """`student`, which alignment and dual-space builders need, or an error saying how to pass it."""
        if student is None:
            raise LossConfigError(f"loss {label!r} needs the student's dimensions: pass student=StudentDims(...) "
                                  "(StudentDims.from_config(model.config))")
        return student


class KDLoss(nn.Module):
    """Base of every loss: `label` names its component, `fields` the store fields it reads,
    `needs` what it reads from `StudentOutputs`."""

    label: str = "loss"
    fields: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset({"logits"})
    # whether it can run from the last hidden state + output head instead of whole logits
    # (`fused_terms`, see `fused`); the trainer fuses when every loss of the config can
    fusable: bool = False

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:  # pragma: no cover
        raise NotImplementedError

    def result(self, value: Tensor) -> LossResult:
        return LossResult(value, {self.label: value.detach()})

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int,
                    dtype: torch.dtype) -> list[Any]:
        """The `fused` terms this loss contributes with weight `weight` (fusable losses only)."""
        raise NotImplementedError(f"loss {self.label!r} needs the student's whole logits (it cannot run fused)")


GradSync = Callable[[Iterable[nn.Parameter]], None]


@runtime_checkable
class AuxiliaryStep(Protocol):
    """A loss that trains a part of its own with its own optimizer (the adversarial loss's
    discriminator). That part is not in `loss.parameters()`, so it never reaches the student's
    optimizer. Each micro-batch the trainer calls `auxiliary_step` before the loss itself (the
    loss then sees the updated part) and merges the returned components into its log; it saves
    `aux_state_dict()` (weights, optimizer, schedule) with its checkpoint and hands it back to
    `load_aux_state_dict` on resume. `sync_grads` (under DDP) averages gradients over ranks and
    must be called before the optimizer steps."""

    def auxiliary_step(self, student: StudentOutputs, batch: Mapping[str, Tensor],
                       sync_grads: GradSync | None = None) -> dict[str, Tensor]: ...

    def aux_state_dict(self) -> dict[str, Any]: ...

    def load_aux_state_dict(self, state: Mapping[str, Any]) -> None: ...


def auxiliary_losses(loss: nn.Module) -> list[AuxiliaryStep]:
    """The losses inside `loss` (a weighted sum, a mix...) that take auxiliary steps, in order."""
    return [m for m in loss.modules() if isinstance(m, AuxiliaryStep)]


def auxiliary_steps(losses: Sequence[AuxiliaryStep], student: StudentOutputs, batch: Mapping[str, Tensor],
                    sync_grads: GradSync | None = None) -> dict[str, Tensor]:
    """Every loss's auxiliary step, in order; components merged like `WeightedSum`'s (a repeated
    key gets '#2', '#3'..., so two adversarial losses log adv_d and adv_d#2 next to adv_g#2)."""
    components: dict[str, Tensor] = {}
    for loss in losses:
        for key, value in loss.auxiliary_step(student, batch, sync_grads).items():
            components[unique_key(key, components)] = value
    return components


def unique_key(key: str, taken: Mapping[str, Any]) -> str:
    """`key`, or `key#2`, `key#3`...: the first that `taken` does not hold (logged components)."""
    name, n = key, 1
    while name in taken:
        n += 1
        name = f"{key}#{n}"
    return name


# ---------------------------------------------------------------- projections


def projection(in_width: int, out_width: int) -> nn.Linear:
    """A learned projection between hidden spaces; the identity when the widths are equal. A
    student cut from the teacher's layers (or of the teacher's width) already writes its hidden
    states in the teacher's space, so dual-space losses start from a meaningful map, not from
    noise that their first steps would push into the student."""
    linear = nn.Linear(in_width, out_width)
    if in_width == out_width:
        with torch.no_grad():
            linear.weight.copy_(torch.eye(in_width))
            linear.bias.zero_()
    return linear


# ---------------------------------------------------------------- masks and reduction


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


TARGET_MASK = "target_mask"  # [B,T] bool: position t's target (token t+1) is trained on; set by the trainer


def kd_mask(batch: Mapping[str, Tensor]) -> Tensor:
    """[B,T] positions whose teacher signal counts: the store row's `valid`, and where the batch
    has a `target_mask` (a chat store's loss mask, folded in by the trainer) only those."""
    valid = batch["valid"].bool()
    return valid & batch[TARGET_MASK].bool() if TARGET_MASK in batch else valid


def label_mask(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Next-token labels [B,T-1] and their mask: position t predicts input_ids[t+1] and counts
    when both t and t+1 are valid (the last position has no label), and its `target_mask` if any."""
    valid = batch["valid"].bool()
    mask = valid[:, :-1] & valid[:, 1:]
    if TARGET_MASK in batch:
        mask = mask & batch[TARGET_MASK].bool()[:, :-1]
    labels = torch.where(mask, batch["input_ids"][:, 1:].long(), 0)
    return labels, mask


def fold_loss_mask(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Turn a store's per-token `loss_mask` (the tokens to learn) into the per-position
    `target_mask` the masks above read: position t predicts token t+1, so it counts when
    loss_mask[t+1]; the last position predicts a token outside the row and never counts.
    A batch without `loss_mask` is returned as is."""
    if "loss_mask" not in batch:
        return batch
    loss_mask = batch["loss_mask"].bool()
    target = torch.zeros_like(loss_mask)
    target[:, :-1] = loss_mask[:, 1:]
    return {**batch, TARGET_MASK: target}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over `mask`; exactly 0 (with zero gradients) when the mask is empty.

    `torch.where` (not multiplication) keeps NaN or inf from masked-out positions out of both the
    value and the gradient.
    """
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


def mean_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Flat per-token weights [N] giving `masked_mean` as a weighted sum: 1/count where `mask`."""
    flat = mask.reshape(-1)
    return flat.to(dtype) / flat.sum().clamp_min(1).to(dtype)


def require(student: StudentOutputs, what: str, label: str) -> None:
    if getattr(student, what) is None:
        how = {
            "hidden_states": "call the student with output_hidden_states=True",
            "attentions": "load the student with attn_implementation='eager' and call it with output_attentions=True",
            "output_head": "pass the student's output embedding weight (model.get_output_embeddings().weight)",
            "last_hidden": "pass the student's last hidden state (the base model's last_hidden_state)",
        }.get(what, "")
        raise ValueError(f"loss {label!r} needs the student's {what}: {how}")


def batch_field(batch: Mapping[str, Tensor], name: str, label: str) -> Tensor:
    try:
        return batch[name]
    except KeyError:
        raise MissingLossFieldError(
            f"loss {label!r} needs batch field {name!r}; the batch holds {sorted(batch)} "
            "(ask KDStream for the loss's `fields`)"
        ) from None


# ---------------------------------------------------------------- NaN/inf detection


def check_finite(result: LossResult, batch: Mapping[str, Tensor]) -> None:
    """Raise `NonFiniteLossError` naming each NaN/inf component and the batch's sample ids.

    One device sync (a single stacked `isfinite`); call it every step or every few steps.
    """
    values = {**result.components, "total": result.total.detach()}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    ok = torch.isfinite(stacked)
    if bool(ok.all()):
        return
    bad = [f"{name}={float(v):g}" for (name, v), good in zip(values.items(), ok.tolist(), strict=True) if not good]
    ids = batch.get("sample_id")
    where = f"sample ids {ids.tolist()}" if isinstance(ids, Tensor) else "a batch without sample_id"
    raise NonFiniteLossError(f"loss component(s) not finite: {', '.join(bad)}; batch with {where}")
