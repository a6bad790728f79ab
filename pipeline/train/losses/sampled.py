"""Random-sampling KD (`sampled_kd`, arXiv 2503.16870) over a sampled store's teacher draws.

`sampled_kd` with `label_tail` (`SampledTailKDLoss`) reads a sampled store's draws as a hybrid
row: the ids drawn twice or more are the head, with c/N as the teacher's probability, and the ids
drawn once are the tail draws, their number over N the tail mass. Plain sampled KD is exactly
this split (same gradient: -Σ (c/N) log q regrouped), so label_tail = λ only moves λ of the
once-drawn ids' weight to the next token where it falls outside that head; the head counts and
the tail's mass stay the teacher's. Once-drawn ids are the noisy part of 12 draws: each stands
for 1/N of the mass, while its p is mostly far smaller. Unbiased where no id has N·p in [1, 2)
(under systematic draws the ids with p < 1/N are exactly those drawn at most once), and like the
label_tail of top-k, it assumes a calibrated teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pipeline.train.losses import base
from pipeline.train.losses.config import capture_power
from pipeline.train.losses.fused import SparseCETerm, Term
from pipeline.train.losses.hybrid import HybridKDLoss
from pipeline.train.losses.output import CE_FIELDS, SAMPLED_FIELDS, fused_result
from pipeline.train.losses.registry import LossConfig, register_loss
from pipeline.train.losses.store_info import StoreInfo


class SampledKDLoss(base.KDLoss):
    """Random-sampling KD (arXiv 2503.16870): CE of the student against the draws' empirical
    distribution, -Σ_i (c_i / n) log q(i), n = Σ_i c_i.

    Each draw is an independent sample of the teacher (at its capture temperature), so
    E[c_i / n] = p_i and the estimator is unbiased in expectation for the teacher's cross-entropy
    CE(p, q) = -Σ p log q, hence for the gradient of KL(p ‖ q) (the teacher's entropy is
    constant). Its value is CE, not KL: it stays above the teacher's entropy. Positions without
    draws (all counts 0) do not count. Reduction: mean over counted positions.
    """

    label = "sampled_kd"
    fields = SAMPLED_FIELDS
    fusable = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def targets(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ids [B,T,n], their empirical weights c/n (0 where not counted), the counted positions."""
        counts = base.batch_field(batch, "draw_counts", self.label).to(dtype)
        ids = base.batch_field(batch, "draw_ids", self.label).long()
        n = counts.sum(-1, keepdim=True)
        mask = base.kd_mask(batch) & (n[..., 0] > 0)
        return ids, torch.where(mask[..., None], counts / n.clamp_min(1), 0.0), mask

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        ids, weights, mask = self.targets(batch, dtype)
        return [SparseCETerm(self.label, weight, self.temperature, ids.flatten(0, -2), weights.flatten(0, -2),
                             base.mean_weights(mask, dtype))]

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        if student.logits is None:
            return fused_result(self, student, batch)
        logits = student.logits
        dtype = base.compute_dtype(logits)
        s = logits.to(dtype)
        if self.temperature != 1.0:
            s = s / self.temperature
        ids, weights, mask = self.targets(batch, dtype)
        lq = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
        return self.result(base.masked_mean(-(weights * lq).sum(-1), mask))


class SampledTailKDLoss(HybridKDLoss):
    """`sampled_kd` with `label_tail`: the hybrid's loss over a sampled row (`sampled_as_hybrid`)."""

    label = "sampled_kd"

    def __init__(self, stored_draws: int, label_tail: float):
        super().__init__(stored_draws, label_tail=label_tail)
        self.fields = (*SAMPLED_FIELDS, *CE_FIELDS)

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        if student.logits is None:
            return self.result(fused_result(self, student, batch).total)
        return super().forward(student, sampled_as_hybrid(batch, self.label))

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        return super().fused_terms(sampled_as_hybrid(batch, self.label), weight, vocab_size, dtype)


def sampled_as_hybrid(batch: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """A sampled batch with the fields of a topk_tail_sample one: head = ids drawn ≥ 2 times
    (log c/N), tail mass = once-drawn ids / N, tail draws = the once-drawn ids; positions without
    draws leave the target mask."""
    counts = base.batch_field(batch, "draw_counts", label).long()
    ids = base.batch_field(batch, "draw_ids", label).long()
    total = counts.sum(-1, keepdim=True)
    head, once = counts >= 2, counts == 1
    # dead head slots need distinct ids outside the head (the student's tail is a scatter over
    # the slots: a repeated id there counts its gradient twice). At most n/2 ids are drawn twice,
    # so n + n/2 + 1 candidates leave n free ones.
    n = ids.shape[-1]
    candidates = torch.arange(n + n // 2 + 1, device=ids.device)
    taken = (candidates[:, None] == torch.where(head, ids, -1)[..., None, :]).any(-1)
    free = torch.argsort(taken.to(torch.uint8), dim=-1, stable=True)[..., :n]  # free candidates, ascending
    share = counts.double() / total.clamp_min(1)  # log(c/N) exact in any compute dtype ([B,T,n]: small)
    drawn = total[..., 0] > 0
    return {
        **batch,
        "topk_ids": torch.where(head, ids, free),
        "topk_logp": torch.where(head, share.log(), float("-inf")),
        "topk_tail": once.sum(-1).double() / total[..., 0].clamp_min(1),
        "tail_ids": torch.where(once, ids, 0),
        "tail_counts": once.long(),
        base.TARGET_MASK: drawn & batch[base.TARGET_MASK].bool() if base.TARGET_MASK in batch else drawn,
    }


class SampledKDConfig(LossConfig):
    """CE against the teacher's sampled draws (unbiased for the forward-KL gradient)."""

    name: Literal["sampled_kd"] = Field(description="sampled_kd")
    temperature: float = Field(1.0, gt=0, description="divides the student's logits; must equal the store's "
                               "sampling temperature")
    label_tail: float = Field(0.0, ge=0, le=1, description="at temperature 1: share of the once-drawn ids' weight "
                              "the next token takes (reads input_ids too)")

    @model_validator(mode="after")
    def _label_tail(self) -> SampledKDConfig:
        if self.label_tail and self.temperature != 1.0:
            raise ValueError(f"label_tail needs temperature 1 (the labels are draws of the data), got {self.temperature}")
        return self


def sampled_fields(cfg: SampledKDConfig, names: Sequence[str]) -> tuple[str, ...]:
    return (*SAMPLED_FIELDS, *CE_FIELDS) if cfg.label_tail else SAMPLED_FIELDS


@register_loss("sampled_kd", config=SampledKDConfig, summary="CE against sampled teacher draws (unbiased)",
               fields=sampled_fields, reads=", ".join(SAMPLED_FIELDS) + " (+ input_ids with label_tail)")
def build_sampled(cfg: SampledKDConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    capture_power(cfg.temperature, False, store, cfg.name, "sampled")
    if cfg.label_tail:
        return SampledTailKDLoss(store.spec.sampled.n_draws if store.spec.sampled else 255, cfg.label_tail)
    return SampledKDLoss(cfg.temperature)
