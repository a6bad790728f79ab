"""Weighted sums of losses: the `mix` loss, and the module every list of losses builds to.

Σ weight_i · loss_i, each part keeping its own `weight`; the parts' components are merged into one
log (a repeated key gets '#2', '#3'..., `base.unique_key`). When every part runs fused, the sum
runs in one fused pass over the logits (`output.fused_result`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch import Tensor, nn

from pipeline.train.losses.base import (
    KDLoss,
    LossConfigError,
    LossResult,
    StudentDims,
    StudentOutputs,
    unique_key,
)
from pipeline.train.losses.output import fused_result
from pipeline.train.losses.registry import LossConfig, build_one, parse_parts, register_loss
from pipeline.train.losses.store_info import StoreInfo


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
                components[unique_key(key, components)] = value
        assert total is not None
        return LossResult(total, components)


class MixConfig(LossConfig):
    """A weighted sum of losses (each with its own `weight`)."""

    name: Literal["mix"] = Field(description="mix")
    losses: list[SerializeAsAny[LossConfig]] = Field(min_length=1, description="the losses summed, each a loss "
                                                     "config with its own name and weight")

    @field_validator("losses", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> list[Any]:
        return parse_parts(value, "losses")


@register_loss("mix", config=MixConfig, summary="weighted sum of losses",
               reads="what its losses read", children=lambda cfg: cfg.losses)
def build_mix(cfg: MixConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    return WeightedSum([(c.weight, build_one(c, store, student)) for c in cfg.losses], label=cfg.name)
