"""Feature-alignment KD (`fakd`, arXiv 2412.19449): weighted hidden + attention + output losses.

A composite: it builds to a weighted sum of the `hidden`, `attention` and output loss it holds,
each part keeping its own `weight`; its store fields are its parts'.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.train.losses.alignment import AttentionLossConfig, HiddenLossConfig
from pipeline.train.losses.base import KDLoss, StudentDims
from pipeline.train.losses.mix import WeightedSum
from pipeline.train.losses.output import DistributionConfig
from pipeline.train.losses.registry import LossConfig, build_one, register_loss
from pipeline.train.losses.sampled import SampledKDConfig
from pipeline.train.losses.store_info import StoreInfo

OutputConfig = Annotated[DistributionConfig | SampledKDConfig, Field(discriminator="name")]


class FAKDConfig(LossConfig):
    """Feature-alignment KD: weighted hidden + attention + output losses. Each part keeps its own
    `weight`; set hidden or attention to null to leave it out."""

    name: Literal["fakd"] = Field(description="fakd")
    output: OutputConfig = Field(DistributionConfig(name="fkl"), description="the output loss (a divergence or "
                                 "sampled_kd config)")
    # standardised: raw MSE against the teacher's outlier dimensions was ~1,300× the KL
    hidden: HiddenLossConfig | None = Field(HiddenLossConfig(metric="zmse"), description="the hidden-state loss "
                                            "(a hidden config), or null")
    attention: AttentionLossConfig | None = Field(AttentionLossConfig(), description="the attention loss (an "
                                                  "attention config), or null")


def parts(cfg: FAKDConfig) -> list[LossConfig]:
    return [part for part in (cfg.hidden, cfg.attention, cfg.output) if part is not None]


@register_loss("fakd", config=FAKDConfig, summary="feature-alignment KD: hidden + attention + output",
               reads="what its hidden, attention and output losses read",
               children=parts)
def build_fakd(cfg: FAKDConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    return WeightedSum([(p.weight, build_one(p, store, student)) for p in parts(cfg)], label=cfg.name)
