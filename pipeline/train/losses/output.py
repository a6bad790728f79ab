"""Output-distribution losses: divergences against top-k stores, sampled KD, hard-label CE.

Each also runs fused (`fused`): from the student's last hidden state and output head, logits
chunk by chunk, one softmax pass for every output loss of a step (`fused_result`, which
`WeightedSum` calls for all its parts at once).

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
    mean_weights,
    require,
)
from pipeline.train.losses.coarse import (
    coarse_live,
    dense_log_probs,
    divergence,
    retemper,
    student_coarse,
    teacher_coarse,
)
from pipeline.train.losses.fused import CoarseTerm, SparseCETerm, Term, fused_output_loss

TOPK_FIELDS = ("topk_ids", "topk_logp", "topk_tail", "valid")
SAMPLED_FIELDS = ("draw_ids", "draw_counts", "valid")
CE_FIELDS = ("input_ids", "valid")
# Online full-logit KD only (never stored): the resident teacher's log-softmax over the whole
# vocabulary at the store's capture temperature. When a batch carries it, distribution losses
# compute the dense divergence instead of the coarsened one.
TEACHER_LOGP = "teacher_logp"


def fused_result(loss: KDLoss, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
    """`loss` (a fusable loss or a weighted sum of them) from last_hidden + output_head, in one
    fused pass; components named as the unfused path names them (a repeated key gets '#2'...)."""
    require(student, "last_hidden", loss.label)
    require(student, "output_head", loss.label)
    hidden, head = student.last_hidden, student.output_head
    if TEACHER_LOGP in batch:
        raise ValueError(f"loss {loss.label!r}: a batch with the teacher's full log-probs needs whole logits "
                         "(online_full_logits runs unfused)")
    terms: list[Term] = loss.fused_terms(batch, 1.0, head.shape[0], compute_dtype(hidden))
    total, values = fused_output_loss(hidden, head, terms)
    components: dict[str, Tensor] = {}
    for term, value in zip(terms, values, strict=True):
        name, n = term.label, 1
        while name in components:
            n += 1
            name = f"{term.label}#{n}"
        components[name] = value
    return LossResult(total, components)


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

    `label_tail` (forward KL at τ = 1 only): the next token as a free draw from the inside of the
    tail. Forward KL = KL_coarse + P_T · KL(r ‖ s) (r, s: teacher and student renormalised over
    the ids not kept, as in `hybrid`), and the coarse part leaves the inside untaught. The label y
    is a sample of the data, which the teacher models: where y is not kept,
    E_y[1[y ∉ K] · (-log s_y)] = Σ_{i ∉ K} p_i (-log s_i) = P_T · CE(r, s) when the teacher is
    calibrated, so the loss adds label_tail · 1[y ∉ K] · (-log q_y + log Q_T), from the tokens the
    store already holds (no bytes). Exact at k = V (no tail: nothing is added).
    """

    fusable = True

    def __init__(self, name: str, param: float | None = None, temperature: float = 1.0, teacher_power: float = 1.0,
                 label_tail: float = 0.0):
        super().__init__()
        self.label = name
        self.divergence = divergence(name, param)
        self.temperature = float(temperature)
        self.teacher_power = float(teacher_power)
        self.label_tail = float(label_tail)
        if self.label_tail and (name != "fkl" or temperature != 1.0 or teacher_power != 1.0):
            raise ValueError(f"loss {name!r}: label_tail estimates forward KL at τ = 1 (the labels are draws of "
                             f"the data at τ = 1); got {name} at temperature {temperature}")
        self.fields = (*TOPK_FIELDS, *CE_FIELDS) if self.label_tail else TOPK_FIELDS

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        if student.logits is None:
            result = fused_result(self, student, batch)
            return self.result(result.total) if self.label_tail else result
        if TEACHER_LOGP in batch:
            return self.result(masked_mean(self.dense(student.logits, batch[TEACHER_LOGP]), kd_mask(batch)))
        lt, ls, live = coarse_pair(student.logits, batch, self.temperature, self.teacher_power, self.label)
        value = self.divergence(lt, ls, live)
        if self.label_tail:
            labels, in_tail = next_token_in_tail(batch, live, self.label)
            s = student.logits.to(ls.dtype)
            log_q = s.gather(-1, labels[..., None])[..., 0] - torch.logsumexp(s, dim=-1)
            value = value + self.label_tail * torch.where(in_tail, ls[..., -1] - log_q, 0.0)
        return self.result(masked_mean(value, kd_mask(batch)))


    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        logp = batch_field(batch, "topk_logp", self.label)
        mask = kd_mask(batch)
        live = coarse_live(logp, mask, vocab_size)
        lt = retemper(teacher_coarse(logp, batch_field(batch, "topk_tail", self.label), live, dtype), live,
                      self.teacher_power)
        ids = batch_field(batch, "topk_ids", self.label).long()
        terms: list[Term] = [CoarseTerm(self.label, weight, self.divergence, self.temperature, ids.flatten(0, -2),
                                        lt.flatten(0, -2), live.flatten(0, -2), mean_weights(mask, dtype))]
        if not self.label_tail:
            return terms
        labels, in_tail = next_token_in_tail(batch, live, self.label)
        if bool(in_tail.any()):
            # -log q_y as a sparse CE, + log Q_T as a coarse "divergence" over the same kept ids
            tw = torch.where(in_tail.reshape(-1), mean_weights(mask, dtype), 0.0)
            w = weight * self.label_tail
            ys = labels.reshape(-1, 1)
            terms += [SparseCETerm(f"{self.label}_label_tail", w, 1.0, ys, torch.ones(ys.shape, dtype=dtype, device=ys.device), tw),
                      CoarseTerm(f"{self.label}_label_tail", w, student_tail_log_mass, 1.0, ids.flatten(0, -2),
                                 lt.flatten(0, -2), live.flatten(0, -2), tw)]
        return terms

    def dense(self, logits: Tensor, teacher_logp: Tensor) -> Tensor:
        """Per-position divergence against the teacher's full distribution (online full-logit
        KD): the k = V case of the coarsened loss; re-tempering is exact here."""
        dtype = compute_dtype(logits)
        lt = teacher_logp.to(dtype)
        if self.teacher_power != 1.0:
            lt = torch.log_softmax(lt * self.teacher_power, dim=-1)
        return self.divergence(lt, dense_log_probs(logits, self.temperature, dtype), None)


def next_token_in_tail(batch: Mapping[str, Tensor], live: Tensor, label: str) -> tuple[Tensor, Tensor]:
    """The next token of each position [B,T] (0 where none), and where it is counted (a label and
    a KD position) and falls in the teacher's tail: not a live kept id, the tail bucket live."""
    labels, mask = label_mask(batch)
    labels, mask = F.pad(labels, (0, 1)), F.pad(mask, (0, 1)) & kd_mask(batch)
    ids = batch_field(batch, "topk_ids", label).long()
    kept = ((ids == labels[..., None]) & live[..., :-1]).any(-1)
    return labels, mask & ~kept & live[..., -1]


def student_tail_log_mass(lt: Tensor, ls: Tensor, live: Tensor) -> Tensor:
    """log Q_T per position (0 where the tail bucket is dead): a `CoarseTerm` divergence."""
    return torch.where(live[..., -1], ls[..., -1], 0.0)


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
    fusable = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def targets(self, batch: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ids [B,T,n], their empirical weights c/n (0 where not counted), the counted positions."""
        counts = batch_field(batch, "draw_counts", self.label).to(dtype)
        ids = batch_field(batch, "draw_ids", self.label).long()
        n = counts.sum(-1, keepdim=True)
        mask = kd_mask(batch) & (n[..., 0] > 0)
        return ids, torch.where(mask[..., None], counts / n.clamp_min(1), 0.0), mask

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        ids, weights, mask = self.targets(batch, dtype)
        return [SparseCETerm(self.label, weight, self.temperature, ids.flatten(0, -2), weights.flatten(0, -2),
                             mean_weights(mask, dtype))]

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        if student.logits is None:
            return fused_result(self, student, batch)
        logits = student.logits
        dtype = compute_dtype(logits)
        s = logits.to(dtype)
        if self.temperature != 1.0:
            s = s / self.temperature
        ids, weights, mask = self.targets(batch, dtype)
        lq = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
        return self.result(masked_mean(-(weights * lq).sum(-1), mask))


class CrossEntropyLoss(KDLoss):
    """Hard-label CE on the next token: position t against input_ids[t+1], where valid[t] and
    valid[t+1]. Reduction: mean over those positions. No temperature."""

    label = "ce"
    fields = CE_FIELDS
    fusable = True

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        labels, mask = label_mask(batch)  # [B,T-1]: the last position has no label
        labels = torch.nn.functional.pad(labels, (0, 1))
        mask = torch.nn.functional.pad(mask, (0, 1))
        ids = labels.reshape(-1, 1)
        return [SparseCETerm(self.label, weight, 1.0, ids, torch.ones(ids.shape, dtype=dtype, device=ids.device),
                             mean_weights(mask, dtype))]

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        if student.logits is None:
            return fused_result(self, student, batch)
        labels, mask = label_mask(batch)
        logits = student.logits[:, :-1]
        per_token = F.cross_entropy(
            logits.to(compute_dtype(logits)).flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)
        return self.result(masked_mean(per_token, mask))
