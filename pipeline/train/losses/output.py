"""Output-distribution losses: divergences against top-k stores, sampled KD, hard-label CE.

Alignment: the store's signals at position t are the teacher's prediction for token t+1, like HF
causal-LM logits, so student logits at t are compared with teacher signals at t (positions where
`valid[t]`), and hard-label CE uses input_ids[t+1] as the label of position t.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.train.losses.base import (
    KDLoss,
    LossResult,
    StudentOutputs,
    batch_field,
    compute_dtype,
    kd_mask,
    label_mask,
    masked_mean,
)
from pipeline.train.losses.coarse import (
    coarse_live,
    dense_log_probs,
    divergence,
    retemper,
    student_coarse,
    teacher_coarse,
)

TOPK_FIELDS = ("topk_ids", "topk_logp", "topk_tail", "valid")
SAMPLED_FIELDS = ("draw_ids", "draw_counts", "valid")
CE_FIELDS = ("input_ids", "valid")
# Online full-logit KD only (never stored): the resident teacher's log-softmax over the whole
# vocabulary at the store's capture temperature. When a batch carries it, distribution losses
# compute the dense divergence instead of the coarsened one.
TEACHER_LOGP = "teacher_logp"


def coarse_pair(
    logits: Tensor,
    batch: Mapping[str, Tensor],
    temperature: float,
    teacher_power: float,
    label: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher and student log-probs over kept ids + tail [B,T,k+1], and the live buckets."""
    dtype = compute_dtype(logits)
    logp = batch_field(batch, "topk_logp", label)
    live = coarse_live(logp, kd_mask(batch), logits.shape[-1])
    lt = teacher_coarse(logp, batch_field(batch, "topk_tail", label), live, dtype)
    lt = retemper(lt, live, teacher_power)
    ls = student_coarse(logits, batch_field(batch, "topk_ids", label), live, temperature, dtype)
    return lt, ls, live


class DistributionLoss(KDLoss):
    """A divergence between the cached teacher and the student over kept ids + one tail bucket.

    Per position: the divergence of the coarsened distributions (exact; the dense divergence when
    k = V). Reduction: mean over positions with valid[t]. No τ² factor: fold one into `weight`
    if wanted. `teacher_power` = τc/τ when re-tempering, else 1.
    """

    fields = TOPK_FIELDS

    def __init__(self, name: str, param: float | None = None, temperature: float = 1.0, teacher_power: float = 1.0):
        super().__init__()
        self.label = name
        self.divergence = divergence(name, param)
        self.temperature = float(temperature)
        self.teacher_power = float(teacher_power)

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        if TEACHER_LOGP in batch:
            return self.result(masked_mean(self.dense(student.logits, batch[TEACHER_LOGP]), kd_mask(batch)))
        lt, ls, live = coarse_pair(student.logits, batch, self.temperature, self.teacher_power, self.label)
        return self.result(masked_mean(self.divergence(lt, ls, live), kd_mask(batch)))

    def dense(self, logits: Tensor, teacher_logp: Tensor) -> Tensor:
        """Per-position divergence against the teacher's full distribution (online full-logit
        KD): the k = V case of the coarsened loss; re-tempering is exact here."""
        dtype = compute_dtype(logits)
        lt = teacher_logp.to(dtype)
        if self.teacher_power != 1.0:
            lt = torch.log_softmax(lt * self.teacher_power, dim=-1)
        return self.divergence(lt, dense_log_probs(logits, self.temperature, dtype), None)


class SampledKDLoss(KDLoss):
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

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        logits = student.logits
        dtype = compute_dtype(logits)
        s = logits.to(dtype)
        if self.temperature != 1.0:
            s = s / self.temperature
        counts = batch_field(batch, "draw_counts", self.label).to(dtype)
        ids = batch_field(batch, "draw_ids", self.label).long()
        n = counts.sum(-1, keepdim=True)
        mask = kd_mask(batch) & (n[..., 0] > 0)
        weights = torch.where(mask[..., None], counts / n.clamp_min(1), 0.0)
        lq = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
        return self.result(masked_mean(-(weights * lq).sum(-1), mask))


class CrossEntropyLoss(KDLoss):
    """Hard-label CE on the next token: position t against input_ids[t+1], where valid[t] and
    valid[t+1]. Reduction: mean over those positions. No temperature."""

    label = "ce"
    fields = CE_FIELDS

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        labels, mask = label_mask(batch)
        logits = student.logits[:, :-1]
        per_token = F.cross_entropy(
            logits.to(compute_dtype(logits)).flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)
        return self.result(masked_mean(per_token, mask))
