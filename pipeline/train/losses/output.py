"""Output-distribution losses: the divergences against top-k stores (fkl, rkl, js, skl, srkl, tvd,
akl) and hard-label CE, with what every output loss shares (`coarse_pair`, `fused_result`).

Each also runs fused (`fused`): from the student's last hidden state and output head, logits
chunk by chunk, one softmax pass for every output loss of a step (`fused_result`, which
`WeightedSum` calls for all its parts at once).

Alignment: the store's signals at position t are the teacher's prediction for token t+1, like HF
causal-LM logits, so student logits at t are compared with teacher signals at t (positions where
`valid[t]`), and hard-label CE uses input_ids[t+1] as the label of position t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from pipeline.train.losses import base
from pipeline.train.losses.coarse import (
    coarse_live,
    dense_log_probs,
    divergence,
    retemper,
    student_coarse,
    teacher_coarse,
)
from pipeline.train.losses.config import DistName, TemperedConfig, capture_power, check_param
from pipeline.train.losses.fused import CoarseTerm, SparseCETerm, Term, fused_output_loss
from pipeline.train.losses.registry import LossConfig, register_loss
from pipeline.train.losses.store_info import StoreInfo

TOPK_FIELDS = ("topk_ids", "topk_logp", "topk_tail", "valid")
SAMPLED_FIELDS = ("draw_ids", "draw_counts", "valid")
CE_FIELDS = ("input_ids", "valid")
# Online full-logit KD only (never stored): the resident teacher's log-softmax over the whole
# vocabulary at the store's capture temperature. When a batch carries it, distribution losses
# compute the dense divergence instead of the coarsened one.
TEACHER_LOGP = "teacher_logp"


def fused_result(loss: base.KDLoss, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
    """`loss` (a fusable loss or a weighted sum of them) from last_hidden + output_head, in one
    fused pass; components named as the unfused path names them (a repeated key gets '#2'...)."""
    base.require(student, "last_hidden", loss.label)
    base.require(student, "output_head", loss.label)
    hidden, head = student.last_hidden, student.output_head
    if TEACHER_LOGP in batch:
        raise ValueError(f"loss {loss.label!r}: a batch with the teacher's full log-probs needs whole logits "
                         "(online_full_logits runs unfused)")
    terms: list[Term] = loss.fused_terms(batch, 1.0, head.shape[0], base.compute_dtype(hidden))
    total, values = fused_output_loss(hidden, head, terms)
    components: dict[str, Tensor] = {}
    for term, value in zip(terms, values, strict=True):
        components[base.unique_key(term.label, components)] = value
    return base.LossResult(total, components)


def coarse_pair(
    logits: Tensor,
    batch: Mapping[str, Tensor],
    temperature: float,
    teacher_power: float,
    label: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher and student log-probs over kept ids + tail [B,T,k+1], and the live buckets."""
    dtype = base.compute_dtype(logits)
    logp = base.batch_field(batch, "topk_logp", label)
    live = coarse_live(logp, base.kd_mask(batch), logits.shape[-1])
    lt = teacher_coarse(logp, base.batch_field(batch, "topk_tail", label), live, dtype)
    lt = retemper(lt, live, teacher_power)
    ls = student_coarse(logits, base.batch_field(batch, "topk_ids", label), live, temperature, dtype)
    return lt, ls, live


class DistributionLoss(base.KDLoss):
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

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        if student.logits is None:
            result = fused_result(self, student, batch)
            return self.result(result.total) if self.label_tail else result
        if TEACHER_LOGP in batch:
            return self.result(base.masked_mean(self.dense(student.logits, batch[TEACHER_LOGP]), base.kd_mask(batch)))
        lt, ls, live = coarse_pair(student.logits, batch, self.temperature, self.teacher_power, self.label)
        value = self.divergence(lt, ls, live)
        if self.label_tail:
            labels, in_tail = next_token_in_tail(batch, live, self.label)
            s = student.logits.to(ls.dtype)
            log_q = s.gather(-1, labels[..., None])[..., 0] - torch.logsumexp(s, dim=-1)
            value = value + self.label_tail * torch.where(in_tail, ls[..., -1] - log_q, 0.0)
        return self.result(base.masked_mean(value, base.kd_mask(batch)))


    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        logp = base.batch_field(batch, "topk_logp", self.label)
        mask = base.kd_mask(batch)
        live = coarse_live(logp, mask, vocab_size)
        lt = retemper(teacher_coarse(logp, base.batch_field(batch, "topk_tail", self.label), live, dtype), live,
                      self.teacher_power)
        ids = base.batch_field(batch, "topk_ids", self.label).long()
        terms: list[Term] = [CoarseTerm(self.label, weight, self.divergence, self.temperature, ids.flatten(0, -2),
                                        lt.flatten(0, -2), live.flatten(0, -2), base.mean_weights(mask, dtype))]
        if not self.label_tail:
            return terms
        labels, in_tail = next_token_in_tail(batch, live, self.label)
        # -log q_y as a sparse CE, + log Q_T as a coarse "divergence" over the same kept ids; a batch
        # without a label in the tail gives them zero weights (exact zeros, no host-device sync)
        tw = torch.where(in_tail.reshape(-1), base.mean_weights(mask, dtype), 0.0)
        w = weight * self.label_tail
        ys = labels.reshape(-1, 1)
        terms += [SparseCETerm(f"{self.label}_label_tail", w, 1.0, ys, torch.ones(ys.shape, dtype=dtype, device=ys.device), tw),
                  CoarseTerm(f"{self.label}_label_tail", w, student_tail_log_mass, 1.0, ids.flatten(0, -2),
                             lt.flatten(0, -2), live.flatten(0, -2), tw)]
        return terms

    def dense(self, logits: Tensor, teacher_logp: Tensor) -> Tensor:
        """Per-position divergence against the teacher's full distribution (online full-logit
        KD): the k = V case of the coarsened loss; re-tempering is exact here."""
        dtype = base.compute_dtype(logits)
        lt = teacher_logp.to(dtype)
        if self.teacher_power != 1.0:
            lt = torch.log_softmax(lt * self.teacher_power, dim=-1)
        return self.divergence(lt, dense_log_probs(logits, self.temperature, dtype), None)


def next_token_in_tail(batch: Mapping[str, Tensor], live: Tensor, label: str) -> tuple[Tensor, Tensor]:
    """The next token of each position [B,T] (0 where none), and where it is counted (a label and
    a KD position) and falls in the teacher's tail: not a live kept id, the tail bucket live."""
    labels, mask = base.label_mask(batch)
    labels, mask = F.pad(labels, (0, 1)), F.pad(mask, (0, 1)) & base.kd_mask(batch)
    ids = base.batch_field(batch, "topk_ids", label).long()
    kept = ((ids == labels[..., None]) & live[..., :-1]).any(-1)
    return labels, mask & ~kept & live[..., -1]


def student_tail_log_mass(lt: Tensor, ls: Tensor, live: Tensor) -> Tensor:
    """log Q_T per position (0 where the tail bucket is dead): a `CoarseTerm` divergence."""
    return torch.where(live[..., -1], ls[..., -1], 0.0)


class CrossEntropyLoss(base.KDLoss):
    """Hard-label CE on the next token: position t against input_ids[t+1], where valid[t] and
    valid[t+1]. Reduction: mean over those positions. No temperature."""

    label = "ce"
    fields = CE_FIELDS
    fusable = True

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        labels, mask = base.label_mask(batch)  # [B,T-1]: the last position has no label
        labels = torch.nn.functional.pad(labels, (0, 1))
        mask = torch.nn.functional.pad(mask, (0, 1))
        ids = labels.reshape(-1, 1)
        return [SparseCETerm(self.label, weight, 1.0, ids, torch.ones(ids.shape, dtype=dtype, device=ids.device),
                             base.mean_weights(mask, dtype))]

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        if student.logits is None:
            return fused_result(self, student, batch)
        labels, mask = base.label_mask(batch)
        logits = student.logits[:, :-1]
        per_token = F.cross_entropy(
            logits.to(base.compute_dtype(logits)).flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)
        return self.result(base.masked_mean(per_token, mask))


# ---------------------------------------------------------------- configs and registration


class DistributionConfig(TemperedConfig):
    """A divergence over the kept ids + one tail bucket of a top-k store."""

    name: DistName = Field(description="fkl, rkl, js, skl, srkl, tvd or akl")
    alpha: float | None = Field(None, gt=0, lt=1, description="skl, srkl: skew (default 0.1)")
    beta: float | None = Field(None, gt=0, lt=1, description="js: mixture weight (default 0.5 = JS)")
    mu: float | None = Field(None, gt=0, le=1, description="akl: head threshold (default 0.5)")
    label_tail: float = Field(0.0, ge=0, description="fkl at temperature 1: weight of the next token as a free "
                              "draw inside the teacher's tail (1 = unbiased; reads input_ids too)")

    @model_validator(mode="after")
    def _params(self) -> DistributionConfig:
        check_param(self.name, self.__dict__)
        if self.label_tail and (self.name != "fkl" or self.temperature != 1.0):
            raise ValueError(f"label_tail applies to fkl at temperature 1 only (the labels are draws of the data), "
                             f"not to {self.name!r} at temperature {self.temperature}")
        return self

    def param(self) -> float | None:
        return check_param(self.name, self.__dict__)


class CEConfig(LossConfig):
    """Hard-label next-token cross-entropy."""

    name: Literal["ce"] = Field(description="ce")


def topk_fields(cfg: DistributionConfig, names: Sequence[str]) -> tuple[str, ...]:
    return (*TOPK_FIELDS, *CE_FIELDS) if cfg.label_tail else TOPK_FIELDS


def build_distribution(cfg: DistributionConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    power = capture_power(cfg.temperature, cfg.retemper, store, cfg.name)
    if cfg.label_tail and power != 1.0:
        raise base.LossConfigError(f"loss {cfg.name!r}: label_tail needs the cached teacher at temperature 1 (the labels "
                              f"are draws at τ = 1), and this store's top-k was captured at τ = {power:g}")
    return DistributionLoss(cfg.name, cfg.param(), cfg.temperature, power, cfg.label_tail)


DIVERGENCES = {
    "fkl": "forward KL(teacher ‖ student)",
    "rkl": "reverse KL(student ‖ teacher)",
    "js": "(generalised) Jensen–Shannon, beta",
    "skl": "skewed forward KL, alpha (DistiLLM)",
    "srkl": "skewed reverse KL, alpha (DistiLLM)",
    "tvd": "total variation distance",
    "akl": "adaptive KL: head/tail-weighted FKL + RKL, mu",
}
for _name, _summary in DIVERGENCES.items():
    register_loss(_name, config=DistributionConfig, summary=_summary, fields=topk_fields,
                  reads=", ".join(TOPK_FIELDS) + " (+ input_ids with label_tail)")(build_distribution)


@register_loss("ce", config=CEConfig, summary="hard-label next-token cross-entropy", fields=CE_FIELDS, tokens="any")
def build_ce(cfg: CEConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    return CrossEntropyLoss()
