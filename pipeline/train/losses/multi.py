"""Multi-teacher distillation from several joined top-k stores (`multi_teacher`).

The stores are joined by sample id (`kdstore.join`): teacher 0's fields keep their plain names
(`topk_ids`, `topk_logp`, `topk_tail`), teacher i's are prefixed (`t1/topk_ids`...). Teacher 0's
`valid` marks the positions that count (the join checks that every store's rows are the same).

Two modes, one divergence D (fkl, rkl, js, skl, srkl, tvd, akl of `pipeline.train.losses.coarse`):

per_teacher
    Σ_i w_i · D(p_i ‖ q), each term over teacher i's own kept ids + one tail bucket: the
    single-teacher `DistributionLoss` run on teacher i's fields (exact for each coarsening).
    Weights are used as given.

mixture
    D(p ‖ q) for the mixed teacher p = Σ_i w_i p_i (weights normalised to sum to 1), made
    exact for one coarsening shared by every teacher and the student. The rule, per position:

    * explicit buckets = the ids kept by EVERY teacher (S = ∩_i K_i; kept = finite log-prob);
    * one rest bucket = every other id, including ids some teachers kept and others did not.

    Why: for an id that teacher j kept and teacher i did not, p_i(id) is unknown (only bounded
    by teacher i's tail mass), so p(id) is unknown; no bucket may hold it alone. A bucket's
    mass is known for teacher i only if the bucket lies inside K_i (a sum of kept values) or
    contains all of V \\ K_i (its tail, plus kept values). With k < V/2 no set V \\ K_i fits
    inside another teacher's K_j, so every bucket holding a not-kept-by-all id must hold every
    teacher's whole tail: S as singletons + one rest bucket is the FINEST partition on which
    every p_i is known. (Only when the kept sets together cover the vocabulary could separate
    rest buckets V \\ K_i be finer; that case is not used.) On it, p(s) = Σ_i w_i p_i(s) for
    s in S, and p(rest) = Σ_i w_i p_i(rest) with p_i(rest) = teacher i's tail + its kept mass
    outside S, summed as a log-sum-exp (no 1 − Σ cancellation). The student is coarsened onto
    the same buckets (`student_coarse`: ids outside S stay in its tail). With k = V for every
    teacher, S is the vocabulary and this is the dense divergence to the dense mixture.
    When teachers disagree, S is small and the mixture target is coarse (two unrelated teachers
    may share no kept id at all: then the only bucket is "everything" and the loss is 0), while
    per_teacher keeps each teacher's full top-k. For fkl the two modes agree densely up to a
    constant (cross-entropy is linear in p: KL(Σ w_i p_i ‖ q) = Σ w_i CE(p_i, q) − H(p), same
    student gradient as Σ w_i KL(p_i ‖ q)), so per_teacher fkl is the better-informed choice.

Cost of the mixture: one [B,T,k0,ki] id comparison per extra teacher (k0, ki their k).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdstore.join import prefixed, split_field
from pipeline.train.losses import base
from pipeline.train.losses.coarse import (
    coarse_live,
    divergence,
    renormalise,
    retemper,
    student_coarse,
    teacher_coarse,
)
from pipeline.train.losses.config import DivergenceConfig, capture_power
from pipeline.train.losses.output import TOPK_FIELDS, DistributionLoss
from pipeline.train.losses.registry import register_loss
from pipeline.train.losses.store_info import StoreInfo

LABEL = "multi_teacher"
SIGNALS = tuple(f for f in TOPK_FIELDS if f != "valid")  # per teacher; `valid` is teacher 0's


def teacher_fields(teacher: int) -> tuple[str, ...]:
    return tuple(prefixed(teacher, f) for f in SIGNALS)


def teacher_view(batch: Mapping[str, Tensor], teacher: int, label: str = LABEL) -> dict[str, Tensor]:
    """Teacher `teacher`'s top-k fields under the plain names a single-teacher loss reads."""
    view = {f: base.batch_field(batch, prefixed(teacher, f), label) for f in SIGNALS}
    view["valid"] = base.batch_field(batch, "valid", label)
    if base.TARGET_MASK in batch:  # a chat store's loss mask (folded by the trainer) counts for every teacher
        view[base.TARGET_MASK] = batch[base.TARGET_MASK]
    return view


def joined_teachers(field_names: Sequence[str]) -> int:
    """How many stores the field names come from (teacher 0 + the prefixed ones)."""
    return 1 + max((split_field(n)[0] for n in field_names), default=0)


def resolve_weights(weights: Sequence[float] | None, field_names: Sequence[str]) -> list[float]:
    """The configured weights (one per teacher, in store order), or equal weights over every
    joined store; more weights than stores is an error naming both counts."""
    stores = joined_teachers(field_names)
    if weights is None:
        return [1.0 / stores] * stores
    if len(weights) > stores:
        raise base.LossConfigError(
            f"loss {LABEL!r} has {len(weights)} weights (teachers 0..{len(weights) - 1}) but only {stores} "
            f"store(s) are joined (teacher 0 = `store`, teachers 1.. = `extra_stores`): give one weight per "
            "teacher or add the missing stores to extra_stores"
        )
    return [float(w) for w in weights]


def multi_fields(cfg: MultiTeacherConfig, field_names: Sequence[str]) -> tuple[str, ...]:
    """The store fields a `multi_teacher` config reads, given the joined store's field names."""
    n = len(resolve_weights(cfg.weights, field_names))
    return (*(f for i in range(n) for f in teacher_fields(i)), "valid")


class MultiTeacherLoss(base.KDLoss):
    """Several cached teachers at once: `per_teacher` or `mixture` (see the module docstring).

    `weights[i]` weighs teacher i; `teacher_powers[i]` = τc_i/τ re-tempers teacher i (1 = as
    captured). Reduction: mean over teacher 0's valid positions. Components: `<div>_t<i>` per
    teacher (unweighted), or `<div>_mix`.
    """

    label = LABEL

    def __init__(
        self,
        mode: str,
        name: str,
        param: float | None,
        weights: Sequence[float],
        temperature: float = 1.0,
        teacher_powers: Sequence[float] | None = None,
    ):
        super().__init__()
        if mode not in ("per_teacher", "mixture"):
            raise base.LossConfigError(f"loss {LABEL!r}: mode must be 'per_teacher' or 'mixture', got {mode!r}")
        if not weights or any(w <= 0 for w in weights):
            raise base.LossConfigError(f"loss {LABEL!r}: weights must be positive, one per teacher, got {list(weights)}")
        powers = [1.0] * len(weights) if teacher_powers is None else [float(p) for p in teacher_powers]
        if len(powers) != len(weights):
            raise base.LossConfigError(f"loss {LABEL!r}: {len(powers)} teacher powers for {len(weights)} weights")
        self.mode, self.name = mode, name
        self.weights = tuple(float(w) for w in weights)
        self.temperature = float(temperature)
        self.teacher_powers = tuple(powers)
        self.divergence = divergence(name, param)
        self.fields = (*(f for i in range(len(weights)) for f in teacher_fields(i)), "valid")
        self.parts = nn.ModuleList(DistributionLoss(name, param, temperature, p) for p in powers)

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        mask = base.kd_mask(batch)
        if self.mode == "mixture":
            lt, ls, live = mixture_pair(student.logits, batch, self.weights, self.temperature, self.teacher_powers)
            value = base.masked_mean(self.divergence(lt, ls, live), mask)
            return base.LossResult(value, {f"{self.name}_mix": value.detach()})
        total: Tensor | None = None
        components = {}
        for i, (weight, part) in enumerate(zip(self.weights, self.parts, strict=True)):
            value = part(student, teacher_view(batch, i, self.label)).total
            components[f"{self.name}_t{i}"] = value.detach()
            total = weight * value if total is None else total + weight * value
        assert total is not None
        return base.LossResult(total, components)


def mixture_pair(
    logits: Tensor,
    batch: Mapping[str, Tensor],
    weights: Sequence[float],
    temperature: float = 1.0,
    teacher_powers: Sequence[float] | None = None,
    label: str = LABEL,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixed-teacher and student log-probs over [teacher 0's kept slots, rest] [B,T,k0+1] and
    the live buckets: a slot is live when every teacher kept its id; the rest bucket is live
    when any id is left over (0 at dead buckets)."""
    dtype = base.compute_dtype(logits)
    vocab = logits.shape[-1]
    mask = base.kd_mask(batch)
    powers = teacher_powers or [1.0] * len(weights)
    own = []  # each teacher on its own buckets: ids, live [.., k_i+1], renormalised log-probs
    for i, power in enumerate(powers):
        view = teacher_view(batch, i, label)
        live = coarse_live(view["topk_logp"], mask, vocab)
        lt = retemper(teacher_coarse(view["topk_logp"], view["topk_tail"], live, dtype), live, power)
        own.append((view["topk_ids"].long(), live, lt))
    ids0 = own[0][0]
    shared = own[0][1][..., :-1]  # teacher 0's kept slots whose id every teacher kept
    matches = []
    for ids, live, _ in own[1:]:
        match = (ids0[..., :, None] == ids[..., None, :]) & live[..., None, :-1]  # [.., k0, k_i]
        matches.append(match)
        shared = shared & match.any(-1)
    parts = []
    for i, (_, live, lt) in enumerate(own):
        if i == 0:
            at_shared, in_shared = lt[..., :-1], shared
        else:  # teacher i's value at each of teacher 0's slots (its ids are distinct: one match)
            match = matches[i - 1]
            at_shared = lt[..., :-1].gather(-1, match.int().argmax(-1))
            in_shared = (match & shared[..., :, None]).any(-2)
        outside = live & ~torch.cat([in_shared, torch.zeros_like(in_shared[..., :1])], -1)
        rest = torch.logsumexp(torch.where(outside, lt, float("-inf")), dim=-1, keepdim=True)
        parts.append(torch.cat([at_shared, rest], -1))
    live = torch.cat([shared, ((shared.sum(-1) < vocab) & mask)[..., None]], -1)
    total = sum(weights)
    log_w = torch.tensor([w / total for w in weights], dtype=dtype, device=logits.device).log()
    lt = torch.logsumexp(torch.stack(parts) + log_w.view(-1, *([1] * parts[0].dim())), dim=0)
    lt = renormalise(lt, live)
    ls = student_coarse(logits, ids0, live, temperature, dtype)
    return lt, ls, live


class MultiTeacherConfig(DivergenceConfig):
    """Several teachers from joined stores (teacher 0 = `store`, 1.. = `extra_stores`)."""

    name: Literal["multi_teacher"] = Field(description="multi_teacher")
    mode: Literal["per_teacher", "mixture"] = Field("per_teacher", description="Σ_i w_i · D(p_i ‖ q), or D of the "
                                                    "weighted mixture of the teachers")
    weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="one per teacher, in store order (default: equal weights over every joined "
        "store); `mixture` normalises them to sum to 1")


@register_loss("multi_teacher", config=MultiTeacherConfig, fields=multi_fields,
               summary="joined teacher stores: per teacher or mixture",
               reads="topk_ids, topk_logp, topk_tail of each teacher (t<i>/topk_ids... for teacher i ≥ 1), valid")
def build_multi(cfg: MultiTeacherConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    weights = resolve_weights(cfg.weights, store.field_names)
    powers = [capture_power(cfg.temperature, cfg.retemper, StoreInfo(store.spec_of(i), store.field_names),
                            f"{cfg.name} (teacher {i})") for i in range(len(weights))]
    return MultiTeacherLoss(cfg.mode, cfg.divergence, cfg.divergence_param, weights, cfg.temperature, powers)
