"""Distillation across vocabularies, from the cache: the student has its own tokenizer.

The batch is the student's (`pipeline.train.cross_tokenizer.Retokenizer`): `input_ids`/`valid` [B, L]
are the student's, `align_pos` pairs student positions with teacher positions, the teacher's own
ids and mask are `teacher_input_ids`/`teacher_valid` [B, T], and the cached signals stay in
teacher positions.

* `xtok_align` — the token-alignment baseline: at paired positions the cached teacher
  distribution is carried into the student's vocabulary through a fixed id map (each teacher id
  → one student id: `first_token` of its text, or `min_edit`, FuseLLM's MinED), the mass of
  teacher ids that land on one student id summed, and the student is distilled over the student
  ids that received mass + one tail bucket holding the stored tail (exact for that coarsened
  target, as `output.DistributionLoss` is for a same-vocabulary store).
* `dskd_cma` — dual-space KD with cross-model attention (arXiv 2406.17328, DSKD-CMA): no
  position pairing and no id map. Student queries [e_s(x); e_s(y)] (embeddings of each student
  token and of its next token, through a learned projection) attend to teacher keys
  [e_t(x); e_t(y)] (the stored teacher embeddings of the teacher tokens and their next tokens;
  both sides normalised), within the same document. Teacher → student: the stored teacher last hidden
  states, projected to the student width and mixed by that attention, go through the student's
  head (detached); the projections learn from CE on the student's next tokens (`cma_t2s_ce`)
  and the student is distilled towards the result (`cma_t2s`, correct-only by default as in the
  authors' code). Student → teacher: the student's last hidden states, projected to the teacher
  width and mixed by the transposed attention, go through the stored teacher head and are
  distilled towards the cached teacher distribution over kept ids + tail (`cma_s2t`). The
  embeddings that form queries and keys are detached: only the projections learn the alignment.
  Projections between equal widths start at the identity (`base.projection`): with a student
  whose embeddings start from the teacher's (same text), the first steps already attend from a
  student token to the teacher tokens of the same text. The config defaults follow the authors'
  recipe (songmzhang/DSKD, dual_space_kd_with_cross_model_attention.py; see `dskd` for the shared
  part: kd_rate 0.5 with the student's CE as `cma_ce`, τ = 2, correct-only t2s KD), including their
  values (`target_values`): the teacher's hidden states and the embeddings of its next tokens, each
  divided by its tensor-wide std, so the t2s projection sees what it is asked to predict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pipeline.train.cross_tokenizer import STORE_FIELDS, TEACHER_PREFIX, vocab_map
from pipeline.train.losses import base, coarse
from pipeline.train.losses.config import DivergenceConfig, capture_power
from pipeline.train.losses.dskd import (
    DualSpaceConfig,
    DualSpaceRecipe,
    last_hidden_field,
    last_layer_and_head,
)
from pipeline.train.losses.output import TOPK_FIELDS, coarse_pair
from pipeline.train.losses.registry import register_loss
from pipeline.train.losses.store_info import StoreInfo

XTOK_FIELDS = (*TOPK_FIELDS[:-1], *STORE_FIELDS)
ALIGN = "align_pos"


def gather_aligned(values: Tensor, pos: Tensor) -> Tensor:
    """values [B, T, ...] at teacher positions pos [B, L] (-1 gives position 0: mask it)."""
    index = pos.clamp_min(0)
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


class TokenAlignKD(base.KDLoss):
    label = "xtok_align"
    fields = XTOK_FIELDS

    def __init__(self, id_map: Tensor, divergence_name: str = "fkl", param: float | None = None,
                 temperature: float = 1.0, teacher_power: float = 1.0):
        super().__init__()
        self.register_buffer("id_map", id_map.long(), persistent=False)
        self.divergence = coarse.divergence(divergence_name, param)
        self.temperature = float(temperature)
        self.teacher_power = float(teacher_power)

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        logits = student.logits
        dtype = base.compute_dtype(logits)
        pos = base.batch_field(batch, ALIGN, self.label)
        mask = (pos >= 0) & batch["valid"].bool()
        ids = gather_aligned(base.batch_field(batch, "topk_ids", self.label).long(), pos)
        logp = gather_aligned(base.batch_field(batch, "topk_logp", self.label), pos).to(dtype)
        tail = gather_aligned(base.batch_field(batch, "topk_tail", self.label), pos)
        kept_p = torch.where(torch.isfinite(logp), logp.exp(), 0.0)
        vocab = logits.shape[-1]
        target = torch.zeros(*ids.shape[:-1], vocab, dtype=dtype, device=logits.device)
        target.scatter_add_(-1, self.id_map[ids], kept_p)
        target_logp = torch.where(target > 0, target.log(), float("-inf"))
        live = coarse.coarse_live(target_logp, mask, vocab)
        lt = coarse.retemper(coarse.teacher_coarse(target_logp, tail, live, dtype), live, self.teacher_power)
        every_id = torch.arange(vocab, device=logits.device).expand_as(target)
        ls = coarse.student_coarse(logits, every_id, live, self.temperature, dtype)
        value = base.masked_mean(self.divergence(lt, ls, live), mask)
        return base.LossResult(value, {self.label: value.detach(), "aligned_fraction": _fraction(mask, batch)})


def _fraction(mask: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    return (mask.sum() / batch["valid"].sum().clamp_min(1)).detach().float()


class CMAConfig(DualSpaceConfig):
    """Dual-space KD with cross-model attention for a student with its own tokenizer (DSKD-CMA)."""

    name: Literal["dskd_cma"] = Field("dskd_cma", description="dskd_cma")
    t2s_correct_only: bool = Field(True, description="the authors' CMA: student-space KD only where the projected "
                                   "teacher predicts the next token")
    target_values: bool = Field(True, description="the authors' values: h_t / std + e_t(next) / std")


class CrossModelAttentionKD(base.KDLoss):
    """DSKD-CMA; its settings are a `CMAConfig` (default: the config's defaults)."""

    label = "dskd_cma"
    needs = frozenset({"logits", "hidden_states", "output_head"})

    def __init__(self, teacher_head: Tensor, teacher_embeddings: Tensor, student_width: int, teacher_layer: int,
                 cfg: CMAConfig | None = None, teacher_power: float = 1.0):
        super().__init__()
        cfg = cfg or CMAConfig()
        d_t = int(teacher_head.shape[1])
        self.query = base.projection(2 * student_width, 2 * d_t)
        self.t2s = base.projection(d_t, student_width)
        self.s2t = base.projection(student_width, d_t)
        self.register_buffer("teacher_head", teacher_head.detach().float(), persistent=False)
        self.register_buffer("teacher_embeddings", teacher_embeddings.detach().float(), persistent=False)
        self.teacher_layer = int(teacher_layer)
        self.fields = (*XTOK_FIELDS, f"hidden_{self.teacher_layer}")
        self.divergence = coarse.divergence(cfg.divergence, cfg.divergence_param)
        self.temperature = float(cfg.temperature)
        self.teacher_power = float(teacher_power)
        self.weights = (float(cfg.s2t_weight), float(cfg.t2s_weight), float(cfg.t2s_ce_weight))
        self.t2s_correct_only = cfg.t2s_correct_only
        self.target_values = cfg.target_values
        self.recipe = DualSpaceRecipe(cfg.kd_rate, cfg.projector_warmup_steps)

    def get_extra_state(self) -> Any:
        return self.recipe.state()

    def set_extra_state(self, state: Any) -> None:
        self.recipe.load(state)

    def attention_scores(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Scores [B, L, T] of student queries against teacher keys, and where a pair may attend."""
        assert student.output_head is not None
        s_ids = batch["input_ids"].long()
        t_ids = base.batch_field(batch, TEACHER_PREFIX + "input_ids", self.label).long()
        s_emb = student.output_head.detach().float()
        query = self.query(_normalised(torch.cat([s_emb[s_ids], _next(s_emb[s_ids])], dim=-1)))
        keys = _normalised(torch.cat([self.teacher_embeddings[t_ids], _next(self.teacher_embeddings[t_ids])], dim=-1))
        scores = query @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        t_valid = batch[TEACHER_PREFIX + "valid"].bool()
        same_doc = batch["doc_ids"][:, :, None] == batch[TEACHER_PREFIX + "doc_ids"][:, None, :]
        allowed = same_doc & batch["valid"].bool()[:, :, None] & t_valid[:, None, :]
        return scores, allowed

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        for what in ("hidden_states", "output_head"):
            base.require(student, what, self.label)
        assert student.hidden_states is not None and student.output_head is not None
        scores, allowed = self.attention_scores(student, batch)
        s_head = student.output_head.detach().float()
        warming = self.recipe.warming(self.training)

        # teacher → student: stored teacher hidden states mixed onto student positions
        h_t = base.batch_field(batch, f"hidden_{self.teacher_layer}", self.label).float()
        if self.target_values:  # the authors' values: h_t / std + e_t(next token) / std
            t_valid = batch[TEACHER_PREFIX + "valid"].bool()
            t_next = _next(self.teacher_embeddings[batch[TEACHER_PREFIX + "input_ids"].long()])
            h_t = h_t / _global_std(h_t, t_valid) + t_next / _global_std(t_next, t_valid)
        a_t2s = _softmax(scores, allowed)
        t2s_logits = F.linear(a_t2s @ self.t2s(h_t), s_head)[:, :-1]
        labels, mask = base.label_mask(batch)
        ce = F.cross_entropy(t2s_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        t2s_ce = base.masked_mean(ce, mask)
        scale = 1.0 / self.temperature
        target = coarse.dense_log_probs(t2s_logits.detach() * scale, 1.0, torch.float32)
        mine = coarse.dense_log_probs(student.logits[:, :-1] * scale, 1.0, torch.float32)
        per = self.divergence(target, mine, None)
        if self.t2s_correct_only:
            per = torch.where(t2s_logits.detach().argmax(-1) == labels, per, 0.0)
        t2s = base.masked_mean(per, mask)

        # student → teacher: student hidden states mixed onto teacher positions, teacher head
        a_s2t = _softmax(scores.transpose(1, 2), allowed.transpose(1, 2))
        h_s = student.hidden_states[-1].float()
        s2t_logits = F.linear(a_s2t @ self.s2t(h_s.detach() if warming else h_s), self.teacher_head)
        t_mask = batch[TEACHER_PREFIX + "valid"].bool() & allowed.any(1)
        teacher_view = {**batch, "valid": t_mask}
        lt, ls, live = coarse_pair(s2t_logits, teacher_view, self.temperature, self.teacher_power, self.label)
        s2t = base.masked_mean(self.divergence(lt, ls, live), t_mask)

        parts = {"cma_s2t": s2t, "cma_t2s": t2s, "cma_t2s_ce": t2s_ce}
        return self.recipe.combine(parts, self.weights, student.logits, batch, warming, "cma_ce")


def _global_std(x: Tensor, valid: Tensor) -> Tensor:
    """One std over every valid position's features (the authors' tensor-wide `.std()`), 1 with
    fewer than two values; masked sums, not a boolean index, so the device never waits for the host."""
    keep = valid[..., None].expand_as(x)
    n = keep.sum().to(x.dtype)
    mean = torch.where(keep, x, 0.0).sum() / n.clamp_min(1)
    var = torch.where(keep, (x - mean).pow(2), 0.0).sum() / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt().clamp_min(1e-6), torch.ones((), dtype=x.dtype, device=x.device))


def _normalised(x: Tensor) -> Tensor:
    return x / x.std(dim=-1, keepdim=True).clamp_min(1e-6)


def _next(embedded: Tensor) -> Tensor:
    """The embedding of each position's next token (zeros after the last)."""
    return torch.cat([embedded[:, 1:], torch.zeros_like(embedded[:, :1])], dim=1)


def _softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the last axis among allowed entries; rows with none give zeros (no NaN)."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(masked.masked_fill(~allowed.any(-1, keepdim=True), 0.0), dim=-1)
    return torch.where(allowed, weights, 0.0)


# ---------------------------------------------------------------- configs and registration


class XTokAlignConfig(DivergenceConfig):
    """Token-alignment baseline for a student with its own tokenizer."""

    name: Literal["xtok_align"] = Field(description="xtok_align")
    vocab_map: Literal["first_token", "min_edit"] = Field("first_token", description="each teacher id → the student "
                                                          "id of its text's first token, or the closest by edit "
                                                          "distance (FuseLLM's MinED)")


@register_loss("xtok_align", config=XTokAlignConfig, fields=XTOK_FIELDS, tokens="student",
               summary="token-alignment KD (position pairing + id map): a student with its own tokenizer")
def build_xtok(cfg: XTokAlignConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    dims = base.StudentDims.required(student, cfg.name)
    if dims.tokenizer is None:
        raise base.LossConfigError(f"loss {cfg.name!r} needs the student's tokenizer: StudentDims(..., tokenizer=...)")
    id_map = vocab_map(store.teacher_tokenizer(cfg.name), dims.tokenizer, cfg.vocab_map)
    if int(id_map.max()) >= (dims.vocab_size or len(dims.tokenizer)):
        raise base.LossConfigError(f"loss {cfg.name!r}: the student tokenizer has ids beyond the model's vocabulary "
                              f"({dims.vocab_size})")
    return TokenAlignKD(id_map, cfg.divergence, cfg.divergence_param, cfg.temperature,
                        capture_power(cfg.temperature, cfg.retemper, store, cfg.name))


@register_loss("dskd_cma", config=CMAConfig, tokens="student",
               summary="dual-space KD with cross-model attention: a student with its own tokenizer",
               fields=lambda cfg, names: (*XTOK_FIELDS, last_hidden_field(cfg, names)),
               reads=", ".join(XTOK_FIELDS) + ", hidden_<teacher's last layer> (+ teacher/output_head, "
                     "input embeddings)")
def build_cma(cfg: CMAConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    dims = base.StudentDims.required(student, cfg.name)
    layer, head = last_layer_and_head(cfg, store)
    return CrossModelAttentionKD(head, store.teacher_embeddings(cfg.name), dims.hidden_size, layer, cfg,
                                 capture_power(cfg.temperature, cfg.retemper, store, cfg.name))
