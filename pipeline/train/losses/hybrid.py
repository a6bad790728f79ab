"""The hybrid sparsifier's loss (`hybrid_kd`): the exact top-k head plus sampled tail draws.

A `topk_tail_sample` store keeps per position the exact top-k head (ids, log-probs over the full
vocabulary, tail mass P_T, as a top-k store) and N draws from the teacher's tail distribution
r_i = p_i / P_T over the ids the head does not keep (`tail_ids` + `tail_counts`). Forward KL splits
exactly into the coarsened divergence over the head + one tail bucket (`coarse`, exact) and the
inside of the tail, weighted by its mass:

    KL(p ‖ q) = KL_coarse(p ‖ q) + P_T · KL(r ‖ s),     s_i = q_i / Q_T (the student's tail, renormalised)

The draws give an unbiased estimate of the student-dependent part of the inside,
E_{i~r}[-log s_i] = CE(r, s) = KL(r ‖ s) + H(r), so

    loss = KL_coarse + P_T · Σ_j w_j (-log s_{id_j}),      E[loss] = KL(p ‖ q) + P_T · H(r)

Its expectation (and that of its gradient) is the dense forward KL up to P_T·H(r), a constant of
the teacher (the tail's entropy is not stored): like `sampled_kd`, the value sits above the KL;
the gradient is unbiased for the dense one. Forward KL only (draws come from the teacher, so only
expectations under p can be estimated). With k = V there is no tail and the loss is the dense KL.

Reuse of fixed draws over epochs: the draws are fixed in the cache, so every epoch would see the
same noisy target. With `draws_per_step` = m < N stored draws, each position uses m of its N draws
per epoch: a fixed seeded permutation of its N draws (keyed by seed, sample id, position), read as a
ring, epoch e taking slots e·m .. e·m+m-1 (mod N); the first N // m epochs see disjoint, hence
independent, draws. The epoch of a row is the batch's `epoch` field when present, else the number
of times this loss has trained on that sample id (saved in the loss's state dict, so a resumed run
continues the rotation). See bench/hybrid_draws.py for the measured bias/variance of both.

`label_tail` = λ ∈ [0, 1]: the next token as one more, free, draw (see `output.DistributionLoss`):
where it falls outside the head, 1[y ∉ K]·(-log s_y) estimates P_T·CE(r, s) too (the data drawn
from a calibrated teacher), so loss = KL_coarse + (1-λ)·P_T·Σ_j w_j (-log s_j) + λ·1[y ∉ K]·(-log s_y)
keeps the same expectation; the label is a sample the store never has to hold, and a fresh one at
every position that no fixed draw repeats.

τ: the draws were taken at the top-k capture temperature, so `temperature` must equal it
(re-tempering a sampled tail is not possible). Reduction: mean over valid positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from pipeline.train.losses import base
from pipeline.train.losses.coarse import coarse_live, dense_log_probs, fkl, teacher_coarse
from pipeline.train.losses.fused import CoarseTerm, SparseCETerm, Term
from pipeline.train.losses.output import (
    CE_FIELDS,
    TEACHER_LOGP,
    TOPK_FIELDS,
    coarse_pair,
    fused_result,
    next_token_in_tail,
    student_tail_log_mass,
)
from pipeline.train.losses.registry import LossConfig, register_loss
from pipeline.train.losses.store_info import StoreInfo

HYBRID_FIELDS = (*TOPK_FIELDS[:-1], "tail_ids", "tail_counts", "valid")


class TailDrawError(ValueError):
    """The tail draws of a batch are not what a `topk_tail_sample` store holds (a draw on a kept id,
    negative counts, more draws than the store's n_draws); names the sample ids."""


class HybridKDLoss(base.KDLoss):
    label = "hybrid_kd"
    fields = HYBRID_FIELDS
    fusable = True

    def __init__(self, stored_draws: int, temperature: float = 1.0, draws_per_step: int | None = None, seed: int = 0,
                 label_tail: float = 0.0):
        super().__init__()
        self.stored_draws = int(stored_draws)
        self.temperature = float(temperature)
        self.draws_per_step = None if draws_per_step is None or draws_per_step >= stored_draws else int(draws_per_step)
        self.seed = int(seed)
        self.visits: dict[int, int] = {}
        self.checked = False  # on an accelerator, the tail draws are checked on the first batch only
        self.label_tail = float(label_tail)
        if not 0 <= self.label_tail <= 1 or (self.label_tail and self.temperature != 1.0):
            raise ValueError(f"loss {self.label!r}: label_tail {label_tail} must lie in [0, 1], at temperature 1 "
                             f"(the labels are draws of the data at τ = 1)")
        self.fields = (*HYBRID_FIELDS, *CE_FIELDS) if self.label_tail else HYBRID_FIELDS

    # the rotation's per-sample epoch counter travels with the loss's state dict (checkpoints)
    def get_extra_state(self) -> Any:
        return {"visits": dict(self.visits)}

    def set_extra_state(self, state: Any) -> None:
        self.visits = {int(k): int(v) for k, v in dict(state.get("visits", {})).items()}

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        if student.logits is None:
            # one component, as unfused: the terms of positions with and without draws summed
            return self.result(fused_result(self, student, batch).total)
        logits = student.logits
        mask = base.kd_mask(batch)
        if TEACHER_LOGP in batch:  # online full-logit KD: the dense forward KL (k = V)
            dtype = base.compute_dtype(logits)
            dense = fkl(batch[TEACHER_LOGP].to(dtype), dense_log_probs(logits, self.temperature, dtype), None)
            return self.result(base.masked_mean(dense, mask))
        lt, ls, live = coarse_pair(logits, batch, self.temperature, 1.0, self.label)
        head = fkl(lt, ls, live)
        ids = base.batch_field(batch, "tail_ids", self.label).long()
        counts = base.batch_field(batch, "tail_counts", self.label).long()
        self._check(batch, ids, counts)
        dtype = lt.dtype
        weights, ids = self._weights(batch, ids, counts.to(dtype))  # [B,T,S] draw weights summing to 1 (or 0)
        s = logits.to(dtype)
        if self.temperature != 1.0:
            s = s / self.temperature
        log_q = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)
        log_s = log_q - ls[..., -1:]  # renormalised over the student's tail
        has_tail = live[..., -1] & (weights.sum(-1) > 0)
        p_tail = torch.where(has_tail, lt[..., -1].exp(), 0.0)
        inside = -(torch.where(weights > 0, weights * log_s, 0.0)).sum(-1)
        value = head + (1 - self.label_tail) * p_tail * torch.where(has_tail, inside, 0.0)
        if self.label_tail:
            labels, in_tail = next_token_in_tail(batch, live, self.label)
            log_qy = s.gather(-1, labels[..., None])[..., 0] - torch.logsumexp(s, dim=-1)
            value = value + self.label_tail * torch.where(in_tail & has_tail, ls[..., -1] - log_qy, 0.0)
        return self.result(base.masked_mean(value, mask))

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Term]:
        """The loss as one sparse CE where a position has draws: KL_coarse + P_T · Σ_j w_j (-log s_j)
        = -Σ_kept p_i log q_i - P_T Σ_j w_j log q_j + Σ_buckets p log p (log Q_T cancels), the last
        sum an offset without gradient; the coarsened KL alone where it has none (k = V)."""
        logp = base.batch_field(batch, "topk_logp", self.label)
        mask = base.kd_mask(batch)
        live = coarse_live(logp, mask, vocab_size)
        lt = teacher_coarse(logp, base.batch_field(batch, "topk_tail", self.label), live, dtype)
        top_ids = base.batch_field(batch, "topk_ids", self.label).long()
        ids = base.batch_field(batch, "tail_ids", self.label).long()
        counts = base.batch_field(batch, "tail_counts", self.label).long()
        self._check(batch, ids, counts)
        weights, ids = self._weights(batch, ids, counts.to(dtype))
        drawn = (live[..., -1] & (weights.sum(-1) > 0)).reshape(-1)
        p = torch.where(live, lt.exp(), 0.0)
        lam = self.label_tail
        targets = torch.cat([p[..., :-1], (1 - lam) * p[..., -1:] * weights], -1)
        ids = torch.cat([top_ids, ids], -1)
        offset = torch.where(live, p * lt, 0.0).sum(-1).reshape(-1)
        token_weight = base.mean_weights(mask, dtype)
        tail_coef = None
        if lam:
            # the label joins the sparse CE; log Q_T then keeps λ·(1[y ∉ K] - P_T) of its coefficient
            labels, in_tail = next_token_in_tail(batch, live, self.label)
            in_tail = in_tail & drawn.view_as(in_tail)
            targets = torch.cat([targets, (lam * in_tail.to(dtype))[..., None]], -1)
            ids = torch.cat([ids, labels[..., None]], -1)
            tail_coef = torch.where(drawn.view_as(in_tail), lam * (in_tail.to(dtype) - p[..., -1]), 0.0).reshape(-1)
        terms: list[Term] = [SparseCETerm(self.label, weight, self.temperature, ids.flatten(0, -2),
                                          torch.where(drawn[:, None], targets.flatten(0, -2), 0.0),
                                          torch.where(drawn, token_weight, 0.0), offset)]
        # terms whose weights are all zero in this batch add exact zeros (no host-device sync to skip them)
        if tail_coef is not None:
            terms.append(CoarseTerm(self.label, weight, student_tail_log_mass, 1.0, top_ids.flatten(0, -2),
                                    lt.flatten(0, -2), live.flatten(0, -2), tail_coef * token_weight))
        undrawn = mask.reshape(-1) & ~drawn
        terms.append(CoarseTerm(self.label, weight, fkl, self.temperature, top_ids.flatten(0, -2), lt.flatten(0, -2),
                                live.flatten(0, -2), torch.where(undrawn, token_weight, 0.0)))
        return terms

    def _check(self, batch: Mapping[str, Tensor], ids: Tensor, counts: Tensor) -> None:
        """Refuse tail draws a topk_tail_sample store cannot hold. Reading the verdict waits for the
        device, so on an accelerator only the first batch is checked (CPU tensors: every batch)."""
        if ids.device.type != "cpu":
            if self.checked:
                return
            self.checked = True
        drawn = counts > 0
        kept = torch.isfinite(batch["topk_logp"])
        on_kept = ((ids[..., :, None] == batch["topk_ids"].long()[..., None, :]) & kept[..., None, :]).any(-1) & drawn
        problems = {
            "tail draws on kept (top-k) ids": on_kept.any(-1),
            "negative tail counts": (counts < 0).any(-1),
            f"more than the store's {self.stored_draws} tail draws": counts.sum(-1) > self.stored_draws,
        }
        flags = torch.stack([bad.any() for bad in problems.values()]).tolist()
        for (what, bad), found in zip(problems.items(), flags, strict=True):
            if found:
                rows = bad.any(-1).nonzero().flatten().tolist()
                where = batch["sample_id"][rows].tolist() if "sample_id" in batch else rows
                raise TailDrawError(f"loss {self.label!r}: {what} at sample ids {where} "
                                    "(tail_ids/tail_counts must come from the same topk_tail_sample store row as topk_ids)")

    def _weights(self, batch: Mapping[str, Tensor], ids: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Per draw (unique id) weights: c_i / n, or the epoch's m-draw window of each position."""
        total = counts.sum(-1, keepdim=True)
        if self.draws_per_step is None:
            return torch.where(total > 0, counts / total.clamp_min(1), 0.0), ids
        m, n = self.draws_per_step, self.stored_draws
        # expand unique ids + counts into n draw slots (sorted by id; slot j < total holds a draw)
        slots = torch.arange(n, device=ids.device).expand(*ids.shape[:-1], n).contiguous()
        owner = torch.searchsorted(counts.long().cumsum(-1).contiguous(), slots, right=True)
        slot_ids = ids.gather(-1, owner.clamp_max(ids.shape[-1] - 1))
        total = total.long()
        filled = slots < total
        rank = self._ranks(batch, ids.shape[0], ids.shape[1], n, ids.device)  # [B,T,n] a permutation of 0..n-1
        epoch = self._epochs(batch).to(ids.device)[:, None, None]
        ring = total.clamp_min(1)
        # rank among the filled slots: filled slots keep their relative order in the permutation
        order = torch.where(filled, rank, n + rank)
        pos = order.argsort(-1).argsort(-1)
        chosen = filled & (((pos - epoch * m) % ring) < torch.minimum(total, torch.tensor(m, device=ids.device)))
        used = chosen.sum(-1, keepdim=True)
        return torch.where(chosen, 1.0 / used.clamp_min(1).to(counts.dtype), 0.0), slot_ids

    def _ranks(self, batch: Mapping[str, Tensor], rows: int, length: int, n: int, device: torch.device) -> Tensor:
        sample_ids = base.batch_field(batch, "sample_id", self.label).tolist()
        out = []
        for sid in sample_ids:
            digest = hashlib.sha256(f"hybrid:{self.seed}:{int(sid)}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            out.append(torch.rand(length, n, generator=g).argsort(-1))
        return torch.stack(out).to(device) if out else torch.zeros(rows, length, n, dtype=torch.long, device=device)

    def _epochs(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "epoch" in batch:
            return batch["epoch"].long().reshape(-1).expand(len(batch["sample_id"])).cpu()
        sample_ids = [int(s) for s in base.batch_field(batch, "sample_id", self.label).tolist()]
        epochs = torch.tensor([self.visits.get(s, 0) for s in sample_ids], dtype=torch.long)
        if self.training and torch.is_grad_enabled():
            for s in sample_ids:
                self.visits[s] = self.visits.get(s, 0) + 1
        return epochs


class HybridKDConfig(LossConfig):
    """The hybrid sparsifier's loss over a `topk_tail_sample` store: exact coarsened forward KL over
    the head + tail draws for the inside of the tail."""

    name: Literal["hybrid_kd"] = Field(description="hybrid_kd")
    temperature: float = Field(1.0, gt=0, description="must equal the store's top-k capture temperature")
    draws_per_step: int | None = Field(None, ge=1, description="tail draws used per position and epoch; null = "
                                       "every stored draw, fewer = rotate through them epoch by epoch")
    seed: int = Field(0, description="seed of the rotation's permutation of each position's draws")
    label_tail: float = Field(0.0, ge=0, le=1, description="share of the inside of the tail the next token "
                              "estimates (reads input_ids too)")


def hybrid_fields(cfg: HybridKDConfig, names: Sequence[str]) -> tuple[str, ...]:
    return (*HYBRID_FIELDS, *CE_FIELDS) if cfg.label_tail else HYBRID_FIELDS


@register_loss("hybrid_kd", config=HybridKDConfig, fields=hybrid_fields,
               summary="top-k head exact + tail draws (topk_tail_sample stores): forward KL, unbiased gradient",
               reads=", ".join(HYBRID_FIELDS) + " (+ input_ids with label_tail)")
def build_hybrid(cfg: HybridKDConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    tail = store.spec.tail_sample
    if tail is None:  # check_fields has named the missing tail fields already; a bare spec lands here
        raise base.LossConfigError("loss 'hybrid_kd' needs a topk_tail_sample store (signals.tail_sample)")
    if cfg.draws_per_step is not None and cfg.draws_per_step > tail.n_draws:
        raise base.LossConfigError(f"loss 'hybrid_kd': draws_per_step {cfg.draws_per_step} > the store's "
                              f"tail_sample.n_draws {tail.n_draws}")
    captured = store.spec.topk.temperature if store.spec.topk is not None else 1.0
    if abs(cfg.temperature - captured) > 1e-12:
        raise base.LossConfigError(f"loss 'hybrid_kd': temperature {cfg.temperature} differs from the store's top-k capture "
                              f"temperature {captured} (its tail draws cannot be re-tempered); use temperature {captured}")
    return HybridKDLoss(tail.n_draws, cfg.temperature, cfg.draws_per_step, cfg.seed, cfg.label_tail)
