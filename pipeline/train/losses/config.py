"""Config pieces several losses share: temperatures, one named divergence, layer maps.

Each loss's own config model lives in the loss's file, next to its module and builder; these are
the bases and types they are built from, and the one rule that ties a loss's temperature to the
store's capture temperature (`capture_power`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.train.losses.base import LossConfigError
from pipeline.train.losses.coarse import DIVERGENCE_PARAMS
from pipeline.train.losses.registry import LossConfig
from pipeline.train.losses.store_info import StoreInfo

DistName = Literal["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]
LayerMapConfig = Literal["uniform", "last"] | list[tuple[int, int]]
DEFAULT_PARAMS = {"alpha": 0.1, "beta": 0.5, "mu": 0.5}
LAYER_MAP = ('"uniform" (every stored teacher layer, spread over the student\'s depth), "last", '
             "or [[student_layer, teacher_layer], ...]")


class TemperedConfig(LossConfig):
    temperature: float = Field(1.0, gt=0, description="divides the student's logits; must equal the store's "
                               "capture temperature unless `retemper`")
    retemper: bool = Field(False, description="re-temper the cached teacher when `temperature` differs from its "
                           "capture temperature (top-k stores; approximate for the tail)")


def check_param(name: str, values: Mapping[str, Any], where: str = "") -> float | None:
    """The one parameter divergence `name` takes (alpha/beta/mu), refusing the others."""
    wanted = DIVERGENCE_PARAMS[name]
    for key in DEFAULT_PARAMS:
        if values.get(key) is not None and key != wanted:
            users = sorted(n for n, k in DIVERGENCE_PARAMS.items() if k == key)
            raise ValueError(f"{where}'{key}' applies to {users} only, not to {name!r}")
    return None if wanted is None else values.get(wanted) or DEFAULT_PARAMS[wanted]


class DivergenceConfig(TemperedConfig):
    """A loss built on one named divergence (with its alpha / beta / mu as `divergence_param`)."""

    divergence: DistName = Field("fkl", description="the divergence: fkl, rkl, js, skl, srkl, tvd or akl")
    divergence_param: float | None = Field(None, gt=0, lt=1, description="alpha (skl, srkl), beta (js) or mu "
                                           "(akl) of `divergence`; default 0.1, 0.5, 0.5")

    @model_validator(mode="after")
    def _param(self) -> DivergenceConfig:
        if self.divergence_param is not None and DIVERGENCE_PARAMS[self.divergence] is None:
            raise ValueError(f"divergence_param does not apply to {self.divergence!r}")
        return self


def capture_power(temperature: float, retemper: bool, store: StoreInfo, label: str, kind: str = "topk") -> float:
    """τc/τ to re-temper the cached teacher, or 1 when τ equals the capture temperature."""
    signal = getattr(store.spec, kind)
    if signal is None:
        return 1.0  # the missing fields are reported by check_fields
    captured = float(signal.temperature)
    if abs(temperature - captured) < 1e-12:
        return 1.0
    if kind == "topk" and retemper:
        return captured / temperature
    hint = "set retemper: true to re-temper the cached teacher over kept ids + tail (approximate), or " if kind == "topk" else ""
    raise LossConfigError(
        f"loss {label!r}: temperature {temperature} differs from the store's {kind} capture temperature "
        f"{captured}; {hint}use temperature {captured}"
    )
