"""Loss configs: pydantic models (`extra="forbid"`), one per registry name, told apart by `name`.

A YAML list of these is what a training config holds under `losses:`; `parse_loss_config` turns a
mapping (or a list) into models, with errors that name the key and, for an unknown loss name,
list the known ones. `weight` multiplies the loss's total in a mix; components are logged
unweighted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from pipeline.config import describe_error
from pipeline.train.losses.base import LossConfigError, UnknownLossError
from pipeline.train.losses.coarse import DIVERGENCE_PARAMS

DistName = Literal["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]
LayerMapConfig = Literal["uniform", "last"] | list[tuple[int, int]]
DEFAULT_PARAMS = {"alpha": 0.1, "beta": 0.5, "mu": 0.5}


class _Loss(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(1.0, ge=0)


class _Tempered(_Loss):
    temperature: float = Field(1.0, gt=0)  # divides the student logits
    retemper: bool = False  # re-temper the cached teacher when temperature ≠ its capture temperature


def _check_param(name: str, values: Mapping[str, Any], where: str) -> float | None:
    """The one parameter divergence `name` takes (alpha/beta/mu), refusing the others."""
    wanted = DIVERGENCE_PARAMS[name]
    for key in DEFAULT_PARAMS:
        if values.get(key) is not None and key != wanted:
            users = sorted(n for n, k in DIVERGENCE_PARAMS.items() if k == key)
            raise ValueError(f"{where}'{key}' applies to {users} only, not to {name!r}")
    return None if wanted is None else values.get(wanted) or DEFAULT_PARAMS[wanted]


class DistributionConfig(_Tempered):
    """fkl, rkl, js (beta), skl / srkl (alpha, DistiLLM), tvd, akl (mu) over top-k stores."""

    name: DistName
    alpha: float | None = Field(None, gt=0, lt=1)  # skl, srkl: skew (default 0.1)
    beta: float | None = Field(None, gt=0, lt=1)  # js: mixture weight (default 0.5 = JS)
    mu: float | None = Field(None, gt=0, le=1)  # akl: head threshold (default 0.5)
    # fkl at τ = 1: weight of the next token as a free draw inside the teacher's tail (1 = unbiased)
    label_tail: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _params(self) -> DistributionConfig:
        _check_param(self.name, self.__dict__, "")
        if self.label_tail and (self.name != "fkl" or self.temperature != 1.0):
            raise ValueError(f"label_tail applies to fkl at temperature 1 only (the labels are draws of the data), "
                             f"not to {self.name!r} at temperature {self.temperature}")
        return self

    def param(self) -> float | None:
        return _check_param(self.name, self.__dict__, "")


class SampledKDConfig(_Loss):
    name: Literal["sampled_kd"]
    temperature: float = Field(1.0, gt=0)  # must equal the store's sampling temperature
    # at τ = 1: share of the once-drawn ids' weight the next token takes (see losses.hybrid)
    label_tail: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _label_tail(self) -> SampledKDConfig:
        if self.label_tail and self.temperature != 1.0:
            raise ValueError(f"label_tail needs temperature 1 (the labels are draws of the data), got {self.temperature}")
        return self


class HybridKDConfig(_Loss):
    """The hybrid sparsifier's loss over a `topk_tail_sample` store: exact coarsened forward KL over
    the head + tail draws for the inside of the tail; see `pipeline.train.losses.hybrid`."""

    name: Literal["hybrid_kd"]
    temperature: float = Field(1.0, gt=0)  # must equal the store's top-k capture temperature
    draws_per_step: int | None = Field(None, ge=1)  # None = every stored draw; fewer = rotate per epoch
    seed: int = 0  # the rotation's permutation of each position's draws
    label_tail: float = Field(0.0, ge=0, le=1)  # share of the inside of the tail the next token estimates


class CEConfig(_Loss):
    name: Literal["ce"]


class HiddenConfig(_Loss):
    name: Literal["hidden"] = "hidden"
    # zmse: MSE in the teacher's standardised space (per-dimension std from teacher/hidden_stats)
    metric: Literal["mse", "cosine", "zmse"] = "mse"
    layer_map: LayerMapConfig = "uniform"  # or [[student_layer, teacher_layer], ...]


class AttentionConfig(_Loss):
    name: Literal["attention"] = "attention"
    metric: Literal["kl", "mse"] = "kl"
    layer_map: LayerMapConfig = "uniform"
    head_map: Literal["mean"] | list[tuple[int, int]] = "mean"  # or [[student_head, teacher_head], ...]


OutputConfig = Annotated[DistributionConfig | SampledKDConfig, Field(discriminator="name")]


class FAKDConfig(_Loss):
    """Feature-alignment KD (arXiv 2412.19449): weighted hidden + attention + output losses.
    Each part keeps its own `weight`; set hidden or attention to null to leave it out."""

    name: Literal["fakd"]
    output: OutputConfig = DistributionConfig(name="fkl")
    # standardised: raw MSE against the teacher's outlier dimensions was ~1,300× the KL
    hidden: HiddenConfig | None = HiddenConfig(metric="zmse")
    attention: AttentionConfig | None = AttentionConfig()


class _Divergence(_Tempered):
    """A loss built on one named divergence (with its alpha / beta / mu as `divergence_param`)."""

    divergence: DistName = "fkl"
    divergence_param: float | None = Field(None, gt=0, lt=1)  # alpha / beta / mu of `divergence`

    @model_validator(mode="after")
    def _param(self) -> _Divergence:
        if self.divergence_param is not None and DIVERGENCE_PARAMS[self.divergence] is None:
            raise ValueError(f"divergence_param does not apply to {self.divergence!r}")
        return self


class _DualSpace(_Divergence):
    """The defaults follow the authors' recipe (songmzhang/DSKD): see `pipeline.train.losses.dskd`."""

    temperature: float = Field(2.0, gt=0)  # the authors' KD temperature, both spaces
    retemper: bool = True  # τ = 2 against a cache captured at τ = 1: re-temper kept ids + tail
    s2t_weight: float = Field(1.0, ge=0)
    t2s_weight: float = Field(1.0, ge=0)
    t2s_ce_weight: float = Field(1.0, ge=0)
    t2s_correct_only: bool = False
    # (1 - kd_rate) · student CE + kd_rate · KD terms; null = KD terms only (add a `ce` loss yourself)
    kd_rate: float | None = Field(0.5, ge=0, le=1)
    projector_warmup_steps: int = Field(0, ge=0)  # train only the projections for this many steps
    teacher_layer: int | None = Field(None, ge=1)  # default: the deepest stored hidden layer


class DSKDConfig(_DualSpace):
    """Dual-space KD (arXiv 2406.17328), same vocabulary; see `pipeline.train.losses.dskd`."""

    name: Literal["dskd"]


class CMAConfig(_DualSpace):
    """Dual-space KD with cross-model attention for a student with its own tokenizer (DSKD-CMA);
    see `pipeline.train.losses.cross_tokenizer`."""

    name: Literal["dskd_cma"]
    t2s_correct_only: bool = True  # the authors' CMA: t2s KD only where the projected teacher is right
    target_values: bool = True  # the authors' values: h_t / std + e_t(next) / std


class XTokAlignConfig(_Divergence):
    """Token-alignment baseline for a student with its own tokenizer; see
    `pipeline.train.losses.cross_tokenizer`."""

    name: Literal["xtok_align"]
    vocab_map: Literal["first_token", "min_edit"] = "first_token"


class MultiTeacherConfig(_Divergence):
    """Several teachers from joined stores (teacher 0 = `store`, 1.. = `extra_stores`); see
    `pipeline.train.losses.multi`. `weights`: one per teacher, in store order (default: equal weights
    over every joined store); `mixture` normalises them to sum to 1."""

    name: Literal["multi_teacher"]
    mode: Literal["per_teacher", "mixture"] = "per_teacher"
    weights: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1)



class AdversarialConfig(_Loss):
    """Adversarial distillation (see `pipeline.train.losses.adversarial`): a discriminator with its own
    optimizer tells cached teacher features from the student's; the student gets the generator
    loss. `layer_map` (feature: hidden only) defaults to "last"; `gradient_penalty` is the R1
    weight γ (γ/2 · ‖∇D(teacher feature)‖²), off when null."""

    name: Literal["adversarial"]
    feature: Literal["hidden", "output"] = "hidden"
    layer_map: LayerMapConfig | None = None
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field([256], min_length=1)
    disc_lr: float = Field(1e-4, gt=0)
    disc_weight_decay: float = Field(0.0, ge=0)
    disc_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    disc_warmup_steps: int = Field(0, ge=0)
    disc_steps_per_step: int = Field(1, ge=1)
    gradient_penalty: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _layer_map(self) -> AdversarialConfig:
        if self.feature == "output" and self.layer_map is not None:
            raise ValueError("layer_map applies to feature: hidden only (feature: output uses the top-k distribution)")
        return self


class MixConfig(_Loss):
    """A weighted sum of losses (each with its own `weight`)."""

    name: Literal["mix"]
    losses: list[LossConfig] = Field(min_length=1)


LossConfig = Annotated[
    DistributionConfig | SampledKDConfig | HybridKDConfig | CEConfig | HiddenConfig | AttentionConfig | FAKDConfig | DSKDConfig
    | MultiTeacherConfig | AdversarialConfig | CMAConfig | XTokAlignConfig | MixConfig,
    Field(discriminator="name"),
]
MixConfig.model_rebuild()

LOSS_CONFIGS: dict[str, type[BaseModel]] = {
    **{name: DistributionConfig for name in DIVERGENCE_PARAMS},
    "sampled_kd": SampledKDConfig,
    "hybrid_kd": HybridKDConfig,
    "ce": CEConfig,
    "hidden": HiddenConfig,
    "attention": AttentionConfig,
    "fakd": FAKDConfig,
    "dskd": DSKDConfig,
    "dskd_cma": CMAConfig,
    "xtok_align": XTokAlignConfig,
    "multi_teacher": MultiTeacherConfig,
    "adversarial": AdversarialConfig,
    "mix": MixConfig,
}
_ADAPTER: TypeAdapter[Any] = TypeAdapter(LossConfig)


def known_names() -> list[str]:
    return sorted(LOSS_CONFIGS)


def _check_names(data: Any, where: str) -> None:
    if not isinstance(data, Mapping):
        raise LossConfigError(f"{where}: expected a mapping with a 'name', got {type(data).__name__}")
    name = data.get("name")
    if name not in LOSS_CONFIGS:
        what = "missing loss name" if name is None else f"unknown loss {name!r}"
        raise UnknownLossError(f"{where}: {what}; known losses: {', '.join(known_names())}")
    if name == "mix":
        for i, child in enumerate(data.get("losses") or []):
            _check_names(child, f"{where}.losses[{i}]")


def parse_loss_config(data: Any, where: str = "losses") -> Any:
    """A mapping → one loss config; a list → a list of them; models pass through."""
    if isinstance(data, BaseModel):
        return data
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        return [parse_loss_config(item, f"{where}[{i}]") for i, item in enumerate(data)]
    _check_names(data, where)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise LossConfigError(f"{where}: " + "; ".join(describe_error(e) for e in exc.errors())) from None
