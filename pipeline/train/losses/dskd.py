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
  the full vocabulary. As in the authors' code, by default only positions where the projected
  teacher predicts the label count for that KD term (`t2s_correct_only`); the others add 0.

total = s2t_weight · s2t + t2s_weight · t2s + t2s_ce_weight · t2s_ce. Projections between equal
widths start at the identity (`base.projection`). The student's own CE is a
separate `ce` loss in the mix. The same divergence and temperature τ serve both spaces; in the
teacher space τ follows the rules of the other top-k losses (store capture temperature, or
`retemper`). Reductions: s2t over valid positions; t2s and t2s_ce over positions with a label
(valid[t] and valid[t+1], t < T-1).
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
    kd_mask,
    label_mask,
    masked_mean,
    projection,
    require,
)
from pipeline.train.losses.coarse import dense_log_probs, divergence
from pipeline.train.losses.output import TOPK_FIELDS, coarse_pair


class DualSpaceKD(KDLoss):
    label = "dskd"
    needs = frozenset({"logits", "hidden_states", "output_head"})

    def __init__(
        self,
        teacher_head: Tensor,
        student_width: int,
        teacher_layer: int,
        divergence_name: str = "fkl",
        param: float | None = None,
        temperature: float = 1.0,
        teacher_power: float = 1.0,
        s2t_weight: float = 1.0,
        t2s_weight: float = 1.0,
        t2s_ce_weight: float = 1.0,
        t2s_correct_only: bool = True,
    ):
        super().__init__()
        teacher_width = int(teacher_head.shape[1])
        self.s2t = projection(student_width, teacher_width)
        self.t2s = projection(teacher_width, student_width)
        # Frozen and not part of the state dict: it lives in the store.
        self.register_buffer("teacher_head", teacher_head.detach().float(), persistent=False)
        self.teacher_layer = int(teacher_layer)
        self.fields = (*TOPK_FIELDS[:-1], f"hidden_{self.teacher_layer}", "input_ids", "valid")
        self.divergence = divergence(divergence_name, param)
        self.temperature = float(temperature)
        self.teacher_power = float(teacher_power)
        self.weights = (float(s2t_weight), float(t2s_weight), float(t2s_ce_weight))
        self.t2s_correct_only = t2s_correct_only

    def _scaled(self, logits: Tensor) -> Tensor:
        return logits / self.temperature if self.temperature != 1.0 else logits

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        for what in ("hidden_states", "output_head"):
            require(student, what, self.label)
        assert student.hidden_states is not None and student.output_head is not None
        h_s = student.hidden_states[-1].float()

        # teacher space: student hidden → teacher space → teacher head, KD against the cache
        s2t_logits = F.linear(self.s2t(h_s), self.teacher_head)
        lt, ls, live = coarse_pair(s2t_logits, batch, self.temperature, self.teacher_power, self.label)
        s2t = masked_mean(self.divergence(lt, ls, live), kd_mask(batch))

        # student space: stored teacher hidden → student space → student head (detached)
        h_t = batch_field(batch, f"hidden_{self.teacher_layer}", self.label).float()
        t2s_logits = F.linear(self.t2s(h_t), student.output_head.detach().float())[:, :-1]
        labels, mask = label_mask(batch)
        ce = F.cross_entropy(t2s_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        t2s_ce = masked_mean(ce, mask)
        target = dense_log_probs(self._scaled(t2s_logits.detach()), 1.0, torch.float32)
        mine = dense_log_probs(self._scaled(student.logits[:, :-1]), 1.0, torch.float32)
        per = self.divergence(target, mine, None)
        if self.t2s_correct_only:
            per = torch.where(t2s_logits.detach().argmax(-1) == labels, per, 0.0)
        t2s = masked_mean(per, mask)

        w_s2t, w_t2s, w_ce = self.weights
        total = w_s2t * s2t + w_t2s * t2s + w_ce * t2s_ce
        parts = {"dskd_s2t": s2t, "dskd_t2s": t2s, "dskd_t2s_ce": t2s_ce}
        return LossResult(total, {k: v.detach() for k, v in parts.items()})
