"""Dual-space KD (arXiv 2406.17328), same vocabulary, from the cache: no resident teacher.

The paper unifies the two models' output spaces with two learned projections:

* teacher space (s2t): the student's last hidden states go through Linear(d_s → d_t) and the
  teacher's frozen output head W_t [V, d_t] (stored once under teacher/output_head); the result
  is distilled towards the cached teacher distribution over kept ids + tail bucket (exact for
  the coarsened distribution, as in `output.DistributionLoss`). Gradients reach the student and
  the projection.
* student space (t2s): the stored teacher last hidden states (hidden_<last>) go through
  Linear(d_t → d_s) and the student's own head, detached (so only the projection learns from
  it); the projection is trained with CE on the ground-truth next token (`dskd_t2s_ce`), and
  the student is distilled towards the projected distribution, detached (`dskd_t2s`), over
  the full vocabulary. With `t2s_correct_only` (off for dskd, as in the authors' DSKD; on for
  their CMA variant) only positions where the projected teacher predicts the label count for that
  KD term; the others add 0.

kd = s2t_weight · s2t + t2s_weight · t2s + t2s_ce_weight · t2s_ce. With `kd_rate` (the authors'
recipe, the config default 0.5) the loss also holds the student's own next-token CE:
total = (1 - kd_rate) · CE + kd_rate · kd (`dskd_ce` component); with kd_rate None, total = kd and
the student's CE is a separate `ce` loss in the mix. Projections between equal widths start at the
identity (`base.projection`).

The recipe of the authors' code (songmzhang/DSKD, code/criterions/dual_space_kd.py and
scripts/*/dskd_*.sh), which the config defaults follow: kd_rate 0.5, every KD term weight 1, the
KD temperature 2.0 dividing the student's and the teacher's logits in both spaces (the t2s CE at
τ = 1), forward KL in the teacher space whatever the divergence of the student space; t2s KD over
every labelled position for DSKD (correct-only only in the CMA variant). Here τ = 2 re-tempers the
cached teacher over its kept ids + tail (`retemper`, default true for dual-space losses). Not
followed: the authors' projectors train at their own learning rate (1e-3 against the student's
5e-4) and start from a random init; ours share the student's learning rate and start at the
identity between equal widths. `projector_warmup_steps` (default 0, as in the authors' training
loop; their code instead offers a projector-only pre-training run) trains only the projections
for that many training steps: t2s KD off, s2t on detached student hidden states. The same divergence and temperature τ serve both spaces; in the
teacher space τ follows the rules of the other top-k losses (store capture temperature, or
`retemper`). Reductions: s2t over valid positions; t2s and t2s_ce over positions with a label
(valid[t] and valid[t+1], t < T-1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pipeline.train.losses import alignment, base
from pipeline.train.losses.coarse import dense_log_probs, divergence
from pipeline.train.losses.config import DivergenceConfig, capture_power
from pipeline.train.losses.output import CE_FIELDS, TOPK_FIELDS, coarse_pair
from pipeline.train.losses.registry import register_loss
from pipeline.train.losses.store_info import StoreInfo


class DualSpaceConfig(DivergenceConfig):
    """What both dual-space losses take; the defaults follow the authors' recipe (songmzhang/DSKD)."""

    temperature: float = Field(2.0, gt=0, description="the authors' KD temperature, both spaces")
    retemper: bool = Field(True, description="τ = 2 against a cache captured at τ = 1: re-temper kept ids + tail")
    s2t_weight: float = Field(1.0, ge=0, description="weight of the teacher-space KD term")
    t2s_weight: float = Field(1.0, ge=0, description="weight of the student-space KD term")
    t2s_ce_weight: float = Field(1.0, ge=0, description="weight of the student-space projection's CE")
    t2s_correct_only: bool = Field(False, description="student-space KD only where the projected teacher predicts "
                                   "the next token")
    kd_rate: float | None = Field(0.5, ge=0, le=1, description="(1 - kd_rate) · student CE + kd_rate · KD terms; "
                                  "null = KD terms only (add a `ce` loss yourself)")
    projector_warmup_steps: int = Field(0, ge=0, description="train only the projections for this many steps")
    teacher_layer: int | None = Field(None, ge=1, description="the teacher's last hidden layer; default: the "
                                      "deepest stored hidden layer")


class DSKDConfig(DualSpaceConfig):
    """Dual-space KD (arXiv 2406.17328), same vocabulary."""

    name: Literal["dskd"] = Field("dskd", description="dskd")


class DualSpaceKD(base.KDLoss):
    """Dual-space KD; its settings are a `DSKDConfig` (default: the config's defaults)."""

    label = "dskd"
    needs = frozenset({"logits", "hidden_states", "output_head"})

    def __init__(self, teacher_head: Tensor, student_width: int, teacher_layer: int, cfg: DSKDConfig | None = None,
                 teacher_power: float = 1.0):
        super().__init__()
        cfg = cfg or DSKDConfig()
        teacher_width = int(teacher_head.shape[1])
        self.s2t = base.projection(student_width, teacher_width)
        self.t2s = base.projection(teacher_width, student_width)
        # Frozen and not part of the state dict: it lives in the store.
        self.register_buffer("teacher_head", teacher_head.detach().float(), persistent=False)
        self.teacher_layer = int(teacher_layer)
        self.fields = (*TOPK_FIELDS[:-1], f"hidden_{self.teacher_layer}", "input_ids", "valid")
        self.divergence = divergence(cfg.divergence, cfg.divergence_param)
        self.temperature = float(cfg.temperature)
        self.teacher_power = float(teacher_power)
        self.weights = (float(cfg.s2t_weight), float(cfg.t2s_weight), float(cfg.t2s_ce_weight))
        self.t2s_correct_only = cfg.t2s_correct_only
        self.recipe = DualSpaceRecipe(cfg.kd_rate, cfg.projector_warmup_steps)

    def get_extra_state(self) -> Any:
        return self.recipe.state()

    def set_extra_state(self, state: Any) -> None:
        self.recipe.load(state)

    def _scaled(self, logits: Tensor) -> Tensor:
        return logits / self.temperature if self.temperature != 1.0 else logits

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        for what in ("hidden_states", "output_head"):
            base.require(student, what, self.label)
        assert student.hidden_states is not None and student.output_head is not None
        h_s = student.hidden_states[-1].float()
        warming = self.recipe.warming(self.training)
        if warming:
            h_s = h_s.detach()

        # teacher space: student hidden → teacher space → teacher head, KD against the cache
        s2t_logits = F.linear(self.s2t(h_s), self.teacher_head)
        lt, ls, live = coarse_pair(s2t_logits, batch, self.temperature, self.teacher_power, self.label)
        s2t = base.masked_mean(self.divergence(lt, ls, live), base.kd_mask(batch))

        # student space: stored teacher hidden → student space → student head (detached)
        h_t = base.batch_field(batch, f"hidden_{self.teacher_layer}", self.label).float()
        t2s_logits = F.linear(self.t2s(h_t), student.output_head.detach().float())[:, :-1]
        labels, mask = base.label_mask(batch)
        ce = F.cross_entropy(t2s_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        t2s_ce = base.masked_mean(ce, mask)
        target = dense_log_probs(self._scaled(t2s_logits.detach()), 1.0, torch.float32)
        mine = dense_log_probs(self._scaled(student.logits[:, :-1]), 1.0, torch.float32)
        per = self.divergence(target, mine, None)
        if self.t2s_correct_only:
            per = torch.where(t2s_logits.detach().argmax(-1) == labels, per, 0.0)
        t2s = base.masked_mean(per, mask)

        parts = {"dskd_s2t": s2t, "dskd_t2s": t2s, "dskd_t2s_ce": t2s_ce}
        return self.recipe.combine(parts, self.weights, student.logits, batch, warming, "dskd_ce")


class DualSpaceRecipe:
    """What the dual-space losses share: the authors' kd_rate mix with the student's CE, and the
    projector warm-up (a count of training forwards, kept in the loss's state dict)."""

    def __init__(self, kd_rate: float | None, warmup_steps: int):
        self.kd_rate = None if kd_rate is None else float(kd_rate)
        self.warmup_steps = int(warmup_steps)
        self.steps = 0

    def state(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load(self, state: Any) -> None:
        self.steps = int(dict(state).get("steps", 0))

    def warming(self, training: bool) -> bool:
        """Whether this forward is a warm-up one (counts training forwards with gradients)."""
        warming = self.steps < self.warmup_steps
        if training and torch.is_grad_enabled():
            self.steps += 1
        return warming

    def combine(self, parts: dict[str, Tensor], weights: tuple[float, float, float], logits: Tensor,
                batch: Mapping[str, Tensor], warming: bool, ce_label: str) -> base.LossResult:
        """parts: s2t, t2s, t2s_ce (in that order) → the weighted total (kd_rate: with the CE)."""
        (s2t, t2s, t2s_ce), (w_s2t, w_t2s, w_ce) = parts.values(), weights
        kd = w_s2t * s2t + (0.0 if warming else w_t2s) * t2s + w_ce * t2s_ce
        components = {k: v.detach() for k, v in parts.items()}
        if self.kd_rate is None:
            return base.LossResult(kd, components)
        labels, mask = base.label_mask(batch)
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        ce = base.masked_mean(ce, mask)
        components[ce_label] = ce.detach()
        return base.LossResult((1.0 - self.kd_rate) * ce + self.kd_rate * kd, components)


# ---------------------------------------------------------------- building


def last_layer_and_head(cfg: DualSpaceConfig, store: StoreInfo) -> tuple[int, Tensor]:
    """The stored hidden layer the teacher's head reads (its last), and that head."""
    stored = alignment.stored_layers(store.field_names, "hidden")
    layer = cfg.teacher_layer if cfg.teacher_layer is not None else (max(stored) if stored else 0)
    if store.teacher_num_layers is not None and layer != store.teacher_num_layers:
        raise base.LossConfigError(
            f"loss {cfg.name!r} needs the teacher's last hidden states (layer {store.teacher_num_layers}, what its head "
            f"reads); it would use hidden_{layer} (stored hidden layers: {stored})"
        )
    head = store.teacher_head(cfg.name)
    if store.spec.hidden is not None and head.shape[1] != store.spec.hidden.width:
        raise base.LossConfigError(f"loss {cfg.name!r}: teacher head width {head.shape[1]} ≠ stored hidden width {store.spec.hidden.width}")
    return layer, head


def last_hidden_field(cfg: DualSpaceConfig, names: Sequence[str]) -> str:
    stored = alignment.stored_layers(names, "hidden")
    layer = cfg.teacher_layer if cfg.teacher_layer is not None else (max(stored) if stored else None)
    return f"hidden_{layer}" if layer is not None else "hidden_<last layer>"


@register_loss("dskd", config=DSKDConfig, summary="dual-space KD from the cache (teacher head stored)",
               fields=lambda cfg, names: (*TOPK_FIELDS[:-1], last_hidden_field(cfg, names), *CE_FIELDS),
               reads="topk_ids, topk_logp, topk_tail, hidden_<teacher's last layer>, input_ids, valid "
                     "(+ teacher/output_head)")
def build_dskd(cfg: DSKDConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    dims = base.StudentDims.required(student, cfg.name)
    layer, head = last_layer_and_head(cfg, store)
    return DualSpaceKD(head, dims.hidden_size, layer, cfg, capture_power(cfg.temperature, cfg.retemper, store, cfg.name))
