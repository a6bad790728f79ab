"""The loss registry: short names → builders, field requirements, and weighted sums.

`build_loss(config, store, student)` turns configs into one `KDLoss` module and checks, before any
step, that the store holds every field the losses read (`check_fields`: the error names the loss
and the missing field). `store` is a `StoreInfo` or anything it is made from (a `StoreReader`, a
`StoreMeta`, a `StoreSpec`); `student` is a `StudentDims`, needed by hidden, attention and
dual-space losses (layer maps and projection widths are fixed at build time, so the projections
exist before the optimizer is made).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from pipeline.train.cross_tokenizer import vocab_map
from pipeline.train.losses import alignment
from pipeline.train.losses.adversarial import AdversarialLoss
from pipeline.train.losses.alignment import AttentionLoss, HiddenLoss
from pipeline.train.losses.base import (
    KDLoss,
    LossConfigError,
    LossResult,
    MissingLossFieldError,
    StudentDims,
    StudentOutputs,
)
from pipeline.train.losses.config import (
    AdversarialConfig,
    AttentionConfig,
    CEConfig,
    CMAConfig,
    DistributionConfig,
    DSKDConfig,
    FAKDConfig,
    HiddenConfig,
    HybridKDConfig,
    MixConfig,
    MultiTeacherConfig,
    SampledKDConfig,
    XTokAlignConfig,
    known_names,
    parse_loss_config,
)
from pipeline.train.losses.cross_tokenizer import XTOK_FIELDS, CrossModelAttentionKD, TokenAlignKD
from pipeline.train.losses.dskd import DualSpaceKD
from pipeline.train.losses.hybrid import HYBRID_FIELDS, HybridKDLoss, SampledTailKDLoss
from pipeline.train.losses.multi import MultiTeacherLoss, multi_fields, resolve_weights
from pipeline.train.losses.output import (
    CE_FIELDS,
    SAMPLED_FIELDS,
    TOPK_FIELDS,
    CrossEntropyLoss,
    DistributionLoss,
    SampledKDLoss,
    fused_result,
)
from pipeline.train.losses.store_info import StoreInfo

CROSS_TOKENIZER_LOSSES = frozenset({"xtok_align", "dskd_cma"})

# ---------------------------------------------------------------- weighted sums


class WeightedSum(KDLoss):
    """Σ weight_i · loss_i; components merged (a repeated key gets '#2', '#3'...)."""

    def __init__(self, parts: Sequence[tuple[float, KDLoss]], label: str = "mix"):
        super().__init__()
        if not parts:
            raise LossConfigError(f"loss {label!r} has no parts")
        self.label = label
        self.weights = tuple(float(w) for w, _ in parts)
        self.losses = nn.ModuleList(loss for _, loss in parts)
        self.fields = tuple(dict.fromkeys(f for _, loss in parts for f in loss.fields))
        self.needs = frozenset().union(*(loss.needs for _, loss in parts))
        self.fusable = all(loss.fusable for _, loss in parts)

    def fused_terms(self, batch: Mapping[str, Tensor], weight: float, vocab_size: int, dtype: torch.dtype) -> list[Any]:
        return [term for w, loss in zip(self.weights, self.losses, strict=True)
                for term in loss.fused_terms(batch, weight * w, vocab_size, dtype)]

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        if student.logits is None and self.fusable:
            return fused_result(self, student, batch)  # one pass over the logits for every part
        total: Tensor | None = None
        components: dict[str, Tensor] = {}
        for weight, loss in zip(self.weights, self.losses, strict=True):
            result = loss(student, batch)
            total = weight * result.total if total is None else total + weight * result.total
            for key, value in result.components.items():
                name, n = key, 1
                while name in components:
                    n += 1
                    name = f"{key}#{n}"
                components[name] = value
        assert total is not None
        return LossResult(total, components)


# ---------------------------------------------------------------- the registry


def _capture_power(cfg: Any, store: StoreInfo, label: str, kind: str = "topk") -> float:
    """τc/τ to re-temper the cached teacher, or 1 when τ equals the capture temperature."""
    signal = getattr(store.spec, kind)
    if signal is None:
        return 1.0  # the missing fields are reported by check_fields
    captured = float(signal.temperature)
    if abs(cfg.temperature - captured) < 1e-12:
        return 1.0
    if kind == "topk" and cfg.retemper:
        return captured / cfg.temperature
    hint = "set retemper: true to re-temper the cached teacher over kept ids + tail (approximate), or " if kind == "topk" else ""
    raise LossConfigError(
        f"loss {label!r}: temperature {cfg.temperature} differs from the store's {kind} capture temperature "
        f"{captured}; {hint}use temperature {captured}"
    )


def _dims(student: StudentDims | None, label: str) -> StudentDims:
    if student is None:
        raise LossConfigError(f"loss {label!r} needs the student's dimensions: pass student=StudentDims(...) (StudentDims.from_config(model.config))")
    return student


def _build_distribution(cfg: DistributionConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    power = _capture_power(cfg, store, cfg.name)
    if cfg.label_tail and power != 1.0:
        raise LossConfigError(f"loss {cfg.name!r}: label_tail needs the cached teacher at temperature 1 (the labels "
                              f"are draws at τ = 1), and this store's top-k was captured at τ = {power:g}")
    return DistributionLoss(cfg.name, cfg.param(), cfg.temperature, power, cfg.label_tail)


def _build_sampled(cfg: SampledKDConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    _capture_power(cfg, store, cfg.name, "sampled")
    if cfg.label_tail:
        return SampledTailKDLoss(store.spec.sampled.n_draws if store.spec.sampled else 255, cfg.label_tail)
    return SampledKDLoss(cfg.temperature)


def _build_hybrid(cfg: HybridKDConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    tail = store.spec.tail_sample
    if tail is None:  # check_fields has named the missing tail fields already; a bare spec lands here
        raise LossConfigError("loss 'hybrid_kd' needs a topk_tail_sample store (signals.tail_sample)")
    if cfg.draws_per_step is not None and cfg.draws_per_step > tail.n_draws:
        raise LossConfigError(f"loss 'hybrid_kd': draws_per_step {cfg.draws_per_step} > the store's "
                              f"tail_sample.n_draws {tail.n_draws}")
    captured = store.spec.topk.temperature if store.spec.topk is not None else 1.0
    if abs(cfg.temperature - captured) > 1e-12:
        raise LossConfigError(f"loss 'hybrid_kd': temperature {cfg.temperature} differs from the store's top-k capture "
                              f"temperature {captured} (its tail draws cannot be re-tempered); use temperature {captured}")
    return HybridKDLoss(tail.n_draws, cfg.temperature, cfg.draws_per_step, cfg.seed, cfg.label_tail)


def _build_ce(cfg: CEConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    return CrossEntropyLoss()


def _build_hidden(cfg: HiddenConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    dims = _dims(student, cfg.name)
    stored = alignment.stored_layers(store.field_names, "hidden")
    width = store.spec.hidden.width if store.spec.hidden is not None else dims.hidden_size
    pairs = alignment.resolve_layer_map(cfg.layer_map, stored, dims.num_layers, "hidden")
    std = None
    if cfg.metric == "zmse":
        std = {layer: s for layer, (_, s) in store.teacher_hidden_stats(cfg.name).items()}
    return HiddenLoss(pairs, cfg.metric, dims.hidden_size, width, std)


def _build_attention(cfg: AttentionConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    dims = _dims(student, cfg.name)
    stored = alignment.stored_layers(store.field_names, "attn")
    pairs = alignment.resolve_layer_map(cfg.layer_map, stored, dims.num_layers, "attn")
    heads = store.spec.attention.heads if store.spec.attention is not None else ()
    topk = [t for t in stored if f"attn_{t}_ids" in store.field_names and f"attn_{t}" not in store.field_names]
    return AttentionLoss(pairs, cfg.metric, cfg.head_map, heads, topk)


def _build_fakd(cfg: FAKDConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    parts = [part for part in (cfg.hidden, cfg.attention, cfg.output) if part is not None]
    return WeightedSum([(p.weight, _build_one(p, store, student)) for p in parts], label=cfg.name)


def _last_layer_and_head(cfg: DSKDConfig | CMAConfig, store: StoreInfo) -> tuple[int, Tensor]:
    """The stored hidden layer the teacher's head reads (its last), and that head."""
    stored = alignment.stored_layers(store.field_names, "hidden")
    layer = cfg.teacher_layer if cfg.teacher_layer is not None else (max(stored) if stored else 0)
    if store.teacher_num_layers is not None and layer != store.teacher_num_layers:
        raise LossConfigError(
            f"loss {cfg.name!r} needs the teacher's last hidden states (layer {store.teacher_num_layers}, what its head "
            f"reads); it would use hidden_{layer} (stored hidden layers: {stored})"
        )
    head = store.teacher_head(cfg.name)
    if store.spec.hidden is not None and head.shape[1] != store.spec.hidden.width:
        raise LossConfigError(f"loss {cfg.name!r}: teacher head width {head.shape[1]} ≠ stored hidden width {store.spec.hidden.width}")
    return layer, head


def _build_dskd(cfg: DSKDConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    dims = _dims(student, cfg.name)
    layer, head = _last_layer_and_head(cfg, store)
    return DualSpaceKD(
        head, dims.hidden_size, layer, cfg.divergence, cfg.divergence_param, cfg.temperature,
        _capture_power(cfg, store, cfg.name), cfg.s2t_weight, cfg.t2s_weight, cfg.t2s_ce_weight, cfg.t2s_correct_only,
        cfg.kd_rate, cfg.projector_warmup_steps,
    )


def _build_cma(cfg: CMAConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    dims = _dims(student, cfg.name)
    layer, head = _last_layer_and_head(cfg, store)
    return CrossModelAttentionKD(
        head, store.teacher_embeddings(cfg.name), dims.hidden_size, layer, cfg.divergence, cfg.divergence_param,
        cfg.temperature, _capture_power(cfg, store, cfg.name), cfg.s2t_weight, cfg.t2s_weight, cfg.t2s_ce_weight,
        cfg.t2s_correct_only, cfg.kd_rate, cfg.projector_warmup_steps, cfg.target_values,
    )


def _build_xtok(cfg: XTokAlignConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    dims = _dims(student, cfg.name)
    if dims.tokenizer is None:
        raise LossConfigError(f"loss {cfg.name!r} needs the student's tokenizer: StudentDims(..., tokenizer=...)")
    id_map = vocab_map(store.teacher_tokenizer(cfg.name), dims.tokenizer, cfg.vocab_map)
    if int(id_map.max()) >= (dims.vocab_size or len(dims.tokenizer)):
        raise LossConfigError(f"loss {cfg.name!r}: the student tokenizer has ids beyond the model's vocabulary "
                              f"({dims.vocab_size})")
    return TokenAlignKD(id_map, cfg.divergence, cfg.divergence_param, cfg.temperature,
                        _capture_power(cfg, store, cfg.name))


def _build_multi(cfg: MultiTeacherConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    weights = resolve_weights(cfg.weights, store.field_names)
    powers = [_capture_power(cfg, StoreInfo(store.spec_of(i), store.field_names), f"{cfg.name} (teacher {i})")
              for i in range(len(weights))]
    return MultiTeacherLoss(cfg.mode, cfg.divergence, cfg.divergence_param, weights, cfg.temperature, powers)


def _build_adversarial(cfg: AdversarialConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    disc = {k: getattr(cfg, k) for k in ("hidden_dims", "disc_lr", "disc_weight_decay", "disc_betas",
                                         "disc_warmup_steps", "disc_steps_per_step", "gradient_penalty")}
    if cfg.feature == "output":
        topk = store.spec.topk
        if topk is None:  # a sampled store: check_fields names the missing top-k fields first
            raise LossConfigError("loss 'adversarial' with feature: output needs a top-k store")
        return AdversarialLoss("output", topk.k + 1, capture_temperature=topk.temperature, **disc)
    dims = _dims(student, cfg.name)
    stored = alignment.stored_layers(store.field_names, "hidden")
    width = store.spec.hidden.width if store.spec.hidden is not None else dims.hidden_size
    pairs = alignment.resolve_layer_map(cfg.layer_map or "last", stored, dims.num_layers, "hidden")
    return AdversarialLoss("hidden", width, pairs=pairs, student_width=dims.hidden_size, **disc)


def _fields_adversarial(cfg: AdversarialConfig, names: Sequence[str]) -> tuple[str, ...]:
    if cfg.feature == "output":
        return TOPK_FIELDS
    return (*alignment.hidden_fields(cfg.layer_map or "last", names), "valid")


def _build_mix(cfg: MixConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    return WeightedSum([(c.weight, _build_one(c, store, student)) for c in cfg.losses], label=cfg.name)


def _last_hidden_field(cfg: DSKDConfig | CMAConfig, names: Sequence[str]) -> str:
    stored = alignment.stored_layers(names, "hidden")
    layer = cfg.teacher_layer if cfg.teacher_layer is not None else (max(stored) if stored else None)
    return f"hidden_{layer}" if layer is not None else "hidden_<last layer>"


def _fields_dskd(cfg: DSKDConfig, names: Sequence[str]) -> tuple[str, ...]:
    return (*TOPK_FIELDS[:-1], _last_hidden_field(cfg, names), *CE_FIELDS)


@dataclass(frozen=True)
class LossEntry:
    """One registry name: its config model, its builder and its store fields."""

    config: type[BaseModel]
    build: Callable[[Any, StoreInfo, StudentDims | None], KDLoss]
    fields: Callable[[Any, Sequence[str]], tuple[str, ...]]
    summary: str


def _topk(cfg: Any, names: Sequence[str]) -> tuple[str, ...]:
    return (*TOPK_FIELDS, *CE_FIELDS) if cfg.label_tail else TOPK_FIELDS


_DIST = {
    "fkl": "forward KL(teacher ‖ student)",
    "rkl": "reverse KL(student ‖ teacher)",
    "js": "(generalised) Jensen–Shannon, beta",
    "skl": "skewed forward KL, alpha (DistiLLM)",
    "srkl": "skewed reverse KL, alpha (DistiLLM)",
    "tvd": "total variation distance",
    "akl": "adaptive KL: head/tail-weighted FKL + RKL, mu",
}
REGISTRY: dict[str, LossEntry] = {
    **{name: LossEntry(DistributionConfig, _build_distribution, _topk, text) for name, text in _DIST.items()},
    "sampled_kd": LossEntry(SampledKDConfig, _build_sampled, lambda c, n: (*SAMPLED_FIELDS, *CE_FIELDS) if c.label_tail else SAMPLED_FIELDS,
                           "CE against sampled teacher draws (unbiased)"),
    "hybrid_kd": LossEntry(HybridKDConfig, _build_hybrid, lambda c, n: (*HYBRID_FIELDS, *CE_FIELDS) if c.label_tail else HYBRID_FIELDS,
                           "top-k head exact + tail draws (topk_tail_sample stores): forward KL, unbiased gradient"),
    "ce": LossEntry(CEConfig, _build_ce, lambda c, n: CE_FIELDS, "hard-label next-token cross-entropy"),
    "hidden": LossEntry(HiddenConfig, _build_hidden, lambda c, n: (*alignment.hidden_fields(c.layer_map, n), "valid"), "hidden-state MSE / cosine"),
    "attention": LossEntry(AttentionConfig, _build_attention, lambda c, n: (*alignment.attention_fields(c.layer_map, n), "valid"), "attention KL / MSE"),
    "fakd": LossEntry(FAKDConfig, _build_fakd, lambda c, n: _union(_leaves_of_config(c, n)), "feature-alignment KD: hidden + attention + output"),
    "dskd": LossEntry(DSKDConfig, _build_dskd, _fields_dskd, "dual-space KD from the cache"),
    "dskd_cma": LossEntry(CMAConfig, _build_cma, lambda c, n: (*XTOK_FIELDS, _last_hidden_field(c, n)),
                          "dual-space KD with cross-model attention: a student with its own tokenizer"),
    "xtok_align": LossEntry(XTokAlignConfig, _build_xtok, lambda c, n: XTOK_FIELDS,
                            "token-alignment KD (position pairing + id map): a student with its own tokenizer"),
    "multi_teacher": LossEntry(MultiTeacherConfig, _build_multi, multi_fields, "joined teacher stores: per teacher or mixture"),
    "adversarial": LossEntry(AdversarialConfig, _build_adversarial, _fields_adversarial, "discriminator on hidden / output features (own optimizer)"),
    "mix": LossEntry(MixConfig, _build_mix, lambda c, n: _union(_leaves_of_config(c, n)), "weighted sum of losses"),
}
assert sorted(REGISTRY) == known_names()


def _build_one(cfg: Any, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    return REGISTRY[cfg.name].build(cfg, store, student)


def build_loss(spec: Any, store: Any, student: StudentDims | None = None) -> KDLoss:
    """Configs (a model, a mapping, or a list of them = a weighted sum) → one loss module.

    Raises `UnknownLossError` / `LossConfigError` for bad configs and `MissingLossFieldError`
    (naming the loss and the field) when the store lacks a field a loss reads.
    """
    info = StoreInfo.of(store)
    cfg = parse_loss_config(spec)
    check_fields(cfg, info.field_names)
    if isinstance(cfg, list):
        loss: KDLoss = WeightedSum([(c.weight, _build_one(c, info, student)) for c in cfg])
    else:
        loss = _build_one(cfg, info, student)
        if cfg.weight != 1.0:
            loss = WeightedSum([(cfg.weight, loss)], label=cfg.name)
    check_fields(loss, info.field_names)
    return loss


# ---------------------------------------------------------------- field checks


def _union(leaves: Iterator[tuple[str, tuple[str, ...]]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for _, fields in leaves for f in fields))


def _leaf_configs(cfg: Any) -> Iterator[Any]:
    """The leaf loss configs of a config (a list, a mix, a fakd composite, or a leaf), in order."""
    if isinstance(cfg, list):
        for child in cfg:
            yield from _leaf_configs(child)
    elif isinstance(cfg, MixConfig):
        yield from _leaf_configs(cfg.losses)
    elif isinstance(cfg, FAKDConfig):
        yield from _leaf_configs([p for p in (cfg.hidden, cfg.attention, cfg.output) if p is not None])
    else:
        yield cfg


def _leaves_of_config(cfg: Any, names: Sequence[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    for leaf in _leaf_configs(cfg):
        yield leaf.name, REGISTRY[leaf.name].fields(leaf, names)


def _leaves(item: Any, names: Sequence[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    if isinstance(item, WeightedSum):
        for child in item.losses:
            yield from _leaves(child, names)
    elif isinstance(item, KDLoss):
        yield item.label, tuple(item.required_fields(names))
    elif isinstance(item, list | tuple):
        for child in item:
            yield from _leaves(child, names)
    else:
        yield from _leaves_of_config(parse_loss_config(item), names)


def loss_names(losses: Any) -> set[str]:
    """The registry names of every leaf loss config (inside lists, mixes and fakd composites)."""
    return {leaf.name for leaf in _leaf_configs(parse_loss_config(losses))}


def check_cross_tokenizer(losses: Any, own_tokenizer: bool) -> bool:
    """Whether batches must be re-tokenised for the student (it has its own tokenizer, or a loss
    aligns vocabularies); refuses same-vocabulary losses there (their signals sit at teacher
    positions): only cross-tokenizer losses and 'ce' may train such a student."""
    names = loss_names(losses)
    cross = sorted(names & CROSS_TOKENIZER_LOSSES)
    others = sorted(names - CROSS_TOKENIZER_LOSSES - {"ce"})
    if (cross or own_tokenizer) and others:
        why = f"next to cross-tokenizer losses {cross}" if cross else "for a student with its own tokenizer (student.tokenizer)"
        raise LossConfigError(f"loss(es) {others} read the teacher's signals at the teacher's token positions; {why} "
                              f"use {' or '.join(sorted(CROSS_TOKENIZER_LOSSES))}, and 'ce'")
    return bool(cross) or own_tokenizer


def required_fields(losses: Any, store_field_names: Sequence[str]) -> tuple[str, ...]:
    """Every store field the losses (configs or built modules) read, in order, once."""
    return _union(_leaves(losses, store_field_names))


def check_fields(losses: Any, store_field_names: Sequence[str]) -> None:
    """Raise `MissingLossFieldError` naming each loss and the store field(s) it lacks."""
    names = set(store_field_names)
    problems = [
        f"loss {label!r} needs store field(s) {missing}"
        for label, fields in _leaves(losses, list(store_field_names))
        if (missing := [f for f in fields if f not in names])
    ]
    if problems:
        raise MissingLossFieldError(f"{'; '.join(problems)}; the store holds {sorted(names)}")
