"""Alignment losses: student hidden states and attention maps against the stored teacher ones.

Layer maps pair student layers with stored teacher layers:
  "last"     the student's last layer with the deepest stored teacher layer;
  "uniform"  every stored teacher layer, by rank: the j-th of m stored layers (j = 1..m, depth
             order) pairs with student depth round(j · L_s / m) (half up, at least 1); for hidden
             states a stored layer 0 (embeddings) pairs with the student's embeddings;
  [[s, t], ...]  explicit (student layer, teacher layer) pairs; t must be stored.
Hidden-state indices follow HF `hidden_states` (0 = embeddings, L = last layer); attention
indices follow HF `attentions` (0 .. L-1), so depth = index + 1.

Hidden states: MSE (mean over features), standardised MSE `zmse`, or cosine distance (1 - cos)
per position, averaged over valid positions and then over layer pairs. When widths differ, each
pair gets a learned Linear(d_student → d_teacher) owned by the loss. `zmse` divides each feature's
error by the teacher's std of that feature (per-dimension statistics of the stored layer, recorded
by the teacher pass: teacher/hidden_stats): mean over d of ((h_s - h_t) / σ_t,d)², i.e. the MSE of
both sides z-scored with the teacher's statistics. A student predicting the teacher's mean scores
1, whatever the teacher's scale; with raw MSE a few outlier dimensions of the teacher (|h| in
the hundreds where the rest is ~1) own the loss (~1,300× the KL on the offline teacher).

Attention: per query row (valid[q]), KL(teacher ‖ student) or the squared error summed over keys,
averaged over rows, mapped heads and layer pairs. Head map "mean" compares head-averaged
distributions; [[s, t], ...] pairs student head s with teacher head t (a stored head id). Stored
rows are quantised, so teacher rows are renormalised. Top-k stores (attn_<L>_ids / _p) compare
on the kept keys plus one tail bucket (teacher tail = 1 - Σ kept, student tail = its mass on the
other keys); with "mean", the teacher's head average is taken over the union of kept keys, and
head-specific mass in another head's tail stays in the tail bucket (approximate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pipeline.train.losses import base
from pipeline.train.losses.config import LAYER_MAP, LayerMapConfig
from pipeline.train.losses.registry import LossConfig, register_loss
from pipeline.train.losses.store_info import StoreInfo

LayerMap = Literal["uniform", "last"] | Sequence[Sequence[int]]
HeadMap = Literal["mean"] | Sequence[Sequence[int]]
ATTN_EPS = 1e-10

_HIDDEN = re.compile(r"hidden_(\d+)$")
_ATTN = re.compile(r"attn_(\d+)(?:_ids|_p)?$")


def stored_layers(field_names: Sequence[str], kind: Literal["hidden", "attn"]) -> list[int]:
    pattern = _HIDDEN if kind == "hidden" else _ATTN
    return sorted({int(m.group(1)) for name in field_names if (m := pattern.match(name))})


def teacher_layers(layer_map: LayerMap, stored: Sequence[int]) -> list[int]:
    if layer_map == "uniform":
        return sorted(stored)
    if layer_map == "last":
        return [max(stored)] if stored else []
    return [int(t) for _, t in layer_map]


def resolve_layer_map(
    layer_map: LayerMap, stored: Sequence[int], student_layers: int, kind: Literal["hidden", "attn"]
) -> list[tuple[int, int]]:
    """(student index, teacher layer) pairs, as documented in the module docstring."""
    top = student_layers if kind == "hidden" else student_layers - 1
    if layer_map == "last":
        return [(top, max(stored))] if stored else []
    if layer_map == "uniform":
        pairs = [(0, 0)] if kind == "hidden" and 0 in stored else []
        deep = sorted(t for t in stored if kind == "attn" or t > 0)
        m = len(deep)
        for j, t in enumerate(deep, start=1):
            depth = max(1, (2 * j * student_layers + m) // (2 * m))
            pairs.append((depth if kind == "hidden" else depth - 1, t))
        return pairs
    pairs = [(int(s), int(t)) for s, t in layer_map]
    bad = [s for s, _ in pairs if not 0 <= s <= top]
    if bad:
        raise base.LossConfigError(f"layer_map student layer(s) {bad} out of range: the student has {kind} indices 0..{top}")
    return pairs


def hidden_fields(layer_map: LayerMap, field_names: Sequence[str]) -> tuple[str, ...]:
    layers = teacher_layers(layer_map, stored_layers(field_names, "hidden"))
    return tuple(f"hidden_{t}" for t in layers) if layers else ("hidden_<layer>",)


def attention_fields(layer_map: LayerMap, field_names: Sequence[str]) -> tuple[str, ...]:
    layers = teacher_layers(layer_map, stored_layers(field_names, "attn"))
    out: list[str] = []
    for t in layers:
        topk = f"attn_{t}_ids" in field_names and f"attn_{t}" not in field_names
        out += [f"attn_{t}_ids", f"attn_{t}_p"] if topk else [f"attn_{t}"]
    return tuple(out) if out else ("attn_<layer>",)


# ---------------------------------------------------------------- hidden states


class HiddenLoss(base.KDLoss):
    needs = frozenset({"hidden_states"})

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        metric: Literal["mse", "cosine", "zmse"],
        student_width: int,
        teacher_width: int,
        teacher_std: Mapping[int, Tensor] | None = None,
    ):
        super().__init__()
        if not pairs:
            raise base.LossConfigError("loss 'hidden': the layer map pairs no layers")
        self.pairs = tuple(pairs)
        self.metric = metric
        if metric == "zmse":
            if teacher_std is None:
                raise base.LossConfigError("loss 'hidden' with metric zmse needs the teacher's hidden statistics")
            scales = []
            for _, t in self.pairs:
                if t not in teacher_std:
                    raise base.LossConfigError(f"loss 'hidden': no statistics for teacher layer {t} (have {sorted(teacher_std)})")
                std = teacher_std[t].float()
                if std.shape != (teacher_width,):
                    raise base.LossConfigError(f"loss 'hidden': statistics of layer {t} have shape {tuple(std.shape)}, "
                                          f"expected ({teacher_width},)")
                # a constant feature (std 0) must not divide by zero: floor at 1e-3 of the median std
                scales.append(1.0 / std.clamp_min(max(float(std.median()) * 1e-3, 1e-8)))
            self.register_buffer("inv_std", torch.stack(scales), persistent=False)
        self.label = f"hidden_{metric}"
        self.fields = (*dict.fromkeys(f"hidden_{t}" for _, t in self.pairs), "valid")
        self.projections = (
            nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in self.pairs)
            if student_width != teacher_width
            else None
        )

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        base.require(student, "hidden_states", self.label)
        hidden = student.hidden_states
        assert hidden is not None
        mask = base.kd_mask(batch)
        values = []
        for i, (s, t) in enumerate(self.pairs):
            if s >= len(hidden):
                raise ValueError(f"loss {self.label!r}: student hidden state {s} requested, the student gave {len(hidden)}")
            hs = hidden[s].float()
            if self.projections is not None:
                hs = self.projections[i](hs)
            ht = base.batch_field(batch, f"hidden_{t}", self.label).to(hs.dtype)
            if self.metric == "mse":
                per = (hs - ht).pow(2).mean(-1)
            elif self.metric == "zmse":
                per = ((hs - ht) * self.inv_std[i].to(hs.dtype)).pow(2).mean(-1)
            else:
                per = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
            values.append(base.masked_mean(per, mask))
        return self.result(torch.stack(values).mean())


# ---------------------------------------------------------------- attention


def _kl_terms(p: Tensor, q: Tensor) -> Tensor:
    """p (log p - log q) with 0 log 0 = 0 and q floored at ATTN_EPS (finite values and grads)."""
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, 1.0))
    return torch.where(positive, p * (log_p - torch.log(q.clamp_min(ATTN_EPS))), 0.0)


def attention_divergence(
    p: Tensor, q: Tensor, metric: Literal["kl", "mse"], keys: Tensor | None = None, p_tail: Tensor | None = None
) -> Tensor:
    """Per query row [..]: teacher p [.., T] (0 off the kept keys), student q [.., T].

    Dense (keys None): buckets are the T keys. Top-k: the kept `keys` [.., T] plus one tail bucket
    (teacher mass `p_tail`, student mass on the other keys). The teacher is renormalised.
    """
    if keys is None:
        z = p.sum(-1)
        p = p / torch.where(z > 0, z, 1.0)[..., None]
        terms = _kl_terms(p, q) if metric == "kl" else (p - q).pow(2)
        return terms.sum(-1)
    assert p_tail is not None
    z = p.sum(-1) + p_tail
    z = torch.where(z > 0, z, 1.0)
    p, p_tail = p / z[..., None], p_tail / z
    q_kept = torch.where(keys, q, 0.0)
    q_tail = torch.where(keys, 0.0, q).sum(-1)
    if metric == "kl":
        return _kl_terms(p, q_kept).sum(-1) + _kl_terms(p_tail, q_tail)
    return (p - q_kept).pow(2).sum(-1) + (p_tail - q_tail).pow(2)


class AttentionLoss(base.KDLoss):
    needs = frozenset({"attentions"})

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        metric: Literal["kl", "mse"],
        head_map: HeadMap,
        stored_heads: Sequence[int],
        topk_layers: Sequence[int] = (),
    ):
        super().__init__()
        if not pairs:
            raise base.LossConfigError("loss 'attention': the layer map pairs no layers")
        self.pairs = tuple(pairs)
        self.metric = metric
        self.label = f"attn_{metric}"
        self.topk_layers = frozenset(topk_layers)
        fields: list[str] = []
        for _, t in self.pairs:
            fields += [f"attn_{t}_ids", f"attn_{t}_p"] if t in self.topk_layers else [f"attn_{t}"]
        self.fields = (*dict.fromkeys(fields), "valid")
        if head_map == "mean":
            self.heads: tuple[tuple[int, int], ...] | None = None
        else:
            stored = list(stored_heads)
            missing = [int(t) for _, t in head_map if int(t) not in stored]
            if missing:
                raise base.LossConfigError(f"loss 'attention': head_map teacher head(s) {missing} are not stored; stored heads: {stored}")
            self.heads = tuple((int(s), stored.index(int(t))) for s, t in head_map)
            if not self.heads:
                raise base.LossConfigError("loss 'attention': head_map is empty")

    def _teacher(self, batch: Mapping[str, Tensor], layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Teacher probs [B,H,T,T] (0 off the kept keys), kept-key mask and tail ([B,H,T]) or None."""
        if layer not in self.topk_layers:
            return base.batch_field(batch, f"attn_{layer}", self.label).to(dtype), None, None
        ids = base.batch_field(batch, f"attn_{layer}_ids", self.label).long()
        vals = base.batch_field(batch, f"attn_{layer}_p", self.label).to(dtype)
        T = ids.shape[-2]
        p = torch.zeros((*ids.shape[:-1], T), dtype=dtype, device=ids.device).scatter_add_(-1, ids, vals)
        keys = torch.zeros(p.shape, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
        return p, keys, (1.0 - vals.sum(-1)).clamp_min(0.0)

    def forward(self, student: base.StudentOutputs, batch: Mapping[str, Tensor]) -> base.LossResult:
        base.require(student, "attentions", self.label)
        attentions = student.attentions
        assert attentions is not None
        rows = base.kd_mask(batch)[:, None, :]  # [B,1,T] query rows
        values = []
        for s, t in self.pairs:
            if s >= len(attentions):
                raise ValueError(f"loss {self.label!r}: student attention layer {s} requested, the student gave {len(attentions)}")
            q = attentions[s].float()
            p, keys, tail = self._teacher(batch, t, q.dtype)
            if self.heads is None:
                q, p = q.mean(1, keepdim=True), p.mean(1, keepdim=True)
                keys = None if keys is None else keys.any(1, keepdim=True)
                tail = None if tail is None else tail.mean(1, keepdim=True)
            else:
                s_idx = [h for h, _ in self.heads]
                t_idx = [h for _, h in self.heads]
                if max(s_idx) >= q.shape[1]:
                    raise ValueError(f"loss {self.label!r}: head_map student head {max(s_idx)} but the student has {q.shape[1]} heads")
                q, p = q[:, s_idx], p[:, t_idx]
                keys = None if keys is None else keys[:, t_idx]
                tail = None if tail is None else tail[:, t_idx]
            per_row = attention_divergence(p, q, self.metric, keys, tail)  # [B,H',T]
            values.append(base.masked_mean(per_row, rows.expand_as(per_row)))
        return self.result(torch.stack(values).mean())


# ---------------------------------------------------------------- configs and registration


class HiddenLossConfig(LossConfig):
    """Student hidden states against stored teacher hidden states."""

    name: Literal["hidden"] = Field("hidden", description="hidden")
    metric: Literal["mse", "cosine", "zmse"] = Field("mse", description="mse, cosine distance, or zmse: MSE in the "
                                                     "teacher's standardised space (teacher/hidden_stats)")
    layer_map: LayerMapConfig = Field("uniform", description=LAYER_MAP)


class AttentionLossConfig(LossConfig):
    """Student attention maps against stored teacher attention rows."""

    name: Literal["attention"] = Field("attention", description="attention")
    metric: Literal["kl", "mse"] = Field("kl", description="per query row: KL(teacher ‖ student) or squared error")
    layer_map: LayerMapConfig = Field("uniform", description=LAYER_MAP)
    head_map: Literal["mean"] | list[tuple[int, int]] = Field(
        "mean", description='"mean" (head-averaged maps) or [[student_head, teacher_head], ...] (stored head ids)')


@register_loss("hidden", config=HiddenLossConfig, summary="hidden-state MSE / cosine / standardised MSE",
               fields=lambda cfg, names: (*hidden_fields(cfg.layer_map, names), "valid"),
               reads="hidden_<layer> of each mapped teacher layer, valid")
def build_hidden(cfg: HiddenLossConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    dims = base.StudentDims.required(student, cfg.name)
    stored = stored_layers(store.field_names, "hidden")
    width = store.spec.hidden.width if store.spec.hidden is not None else dims.hidden_size
    pairs = resolve_layer_map(cfg.layer_map, stored, dims.num_layers, "hidden")
    std = None
    if cfg.metric == "zmse":
        std = {layer: s for layer, (_, s) in store.teacher_hidden_stats(cfg.name).items()}
    return HiddenLoss(pairs, cfg.metric, dims.hidden_size, width, std)


@register_loss("attention", config=AttentionLossConfig, summary="attention KL / MSE",
               fields=lambda cfg, names: (*attention_fields(cfg.layer_map, names), "valid"),
               reads="attn_<layer> (or attn_<layer>_ids + attn_<layer>_p) of each mapped teacher layer, valid")
def build_attention(cfg: AttentionLossConfig, store: StoreInfo, student: base.StudentDims | None) -> base.KDLoss:
    dims = base.StudentDims.required(student, cfg.name)
    stored = stored_layers(store.field_names, "attn")
    pairs = resolve_layer_map(cfg.layer_map, stored, dims.num_layers, "attn")
    heads = store.spec.attention.heads if store.spec.attention is not None else ()
    topk = [t for t in stored if f"attn_{t}_ids" in store.field_names and f"attn_{t}" not in store.field_names]
    return AttentionLoss(pairs, cfg.metric, cfg.head_map, heads, topk)
