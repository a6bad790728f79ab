"""Adversarial distillation from the cache: a discriminator learns to tell cached teacher features
from the student's, and the student learns to fool it.

Why: the other losses match the teacher point by point (a divergence per position); a
discriminator instead judges whether a student feature could have come from the teacher's
feature distribution, which penalises what a per-position metric averages away. The teacher is
never resident: its features are the cached ones.

Features (one vector per valid position):
  hidden  cached hidden_<t> [B,T,d_t] against the student's hidden_states[s] through a learned
          Linear(d_s → d_t) when the widths differ (as in `alignment.HiddenLoss`; the projection
          is part of the student side, trained by the student's optimizer). Layer map as in
          `alignment` (default "last"); one discriminator per layer pair.
  output  the coarsened distributions over the kept ids + one tail bucket (`coarse`): teacher
          and student log-probs [B,T,k+1], the student at the store's capture temperature so
          both sides are the same kind of distribution. Masked positions and dead buckets are 0.

Each micro-batch (the trainer calls `auxiliary_step`, then the loss):
  1. discriminator update(s), `disc_steps_per_step` of them on the same detached features:
     BCE-with-logits, teacher = 1, student = 0, each side averaged over valid positions, plus an
     optional R1 penalty γ/2 · ‖∇ₓD(x)‖² on teacher features (`gradient_penalty`). Under DDP the
     trainer's `sync_grads` averages the discriminator's gradients over ranks before each update.
     A non-finite discriminator loss stops training (NonFiniteLossError naming the
     "adversarial discriminator" and the sample ids) before the update can corrupt it.
  2. the student's loss: the non-saturating generator loss −log D(student feature) =
     softplus(−D), averaged over valid positions (and layer pairs), through the projection and
     the updated discriminator with its weights detached (the student's backward never gives
     the discriminator gradients).
Logged: `adv_g` (the student's loss), `adv_d` (the discriminator loss of the last update) and
`disc_acc` (its accuracy on both sides before that update, ½ = chance).

The discriminators, their AdamW and their schedule (linear warm-up over `disc_warmup_steps`
updates, then constant) live outside the module tree (a tuple attribute), so `loss.parameters()`
and `loss.state_dict()` stay the student side's; `aux_state_dict()` carries the rest through
checkpoints, and `_apply` moves them with the loss (`.to(device)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pipeline.train.losses import alignment
from pipeline.train.losses.base import (
    GradSync,
    KDLoss,
    LossConfigError,
    LossResult,
    NonFiniteLossError,
    StudentDims,
    StudentOutputs,
    batch_field,
    check_finite,
    kd_mask,
    masked_mean,
    require,
)
from pipeline.train.losses.config import LAYER_MAP, LayerMapConfig
from pipeline.train.losses.output import TOPK_FIELDS, coarse_pair
from pipeline.train.losses.registry import LossConfig, register_loss
from pipeline.train.losses.store_info import StoreInfo

LEAKY_SLOPE = 0.2


class Discriminator(nn.Module):
    """MLP: feature [.., width] → one logit [..] (teacher = positive), LeakyReLU(0.2) between."""

    def __init__(self, width: int, hidden_dims: Sequence[int]):
        super().__init__()
        dims = [int(width), *(int(d) for d in hidden_dims), 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        """`frozen`: use detached weights, so gradients reach `x` but not the discriminator."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            w, b = (layer.weight.detach(), layer.bias.detach()) if frozen else (layer.weight, layer.bias)
            x = F.linear(x, w, b)
            if i < last:
                x = F.leaky_relu(x, LEAKY_SLOPE)
        return x.squeeze(-1)


class _WarmUp:
    """Learning-rate factor: linear warm-up over `steps` updates, then 1 (a callable object, so
    LambdaLR's state dict records it)."""

    def __init__(self, steps: int):
        self.steps = int(steps)

    def __call__(self, step: int) -> float:
        return (step + 1) / self.steps if step < self.steps else 1.0


def discriminator_loss(disc: Discriminator, teacher: Tensor, student: Tensor, mask: Tensor,
                       gradient_penalty: float | None = None) -> tuple[Tensor, Tensor]:
    """(BCE loss [+ R1 penalty], accuracy) of `disc` on detached teacher (1) / student (0)
    features [B,T,D] at the positions of `mask` [B,T]."""
    if gradient_penalty is not None:
        teacher = teacher.detach().requires_grad_(True)
    d_t, d_s = disc(teacher), disc(student)
    loss = masked_mean(F.softplus(-d_t), mask) + masked_mean(F.softplus(d_s), mask)
    if gradient_penalty is not None:
        (grad,) = torch.autograd.grad(d_t.sum(), teacher, create_graph=True)  # positions are independent
        loss = loss + 0.5 * gradient_penalty * masked_mean(grad.pow(2).sum(-1), mask)
    acc = 0.5 * (masked_mean((d_t > 0).float(), mask) + masked_mean((d_s < 0).float(), mask))
    return loss, acc.detach()


class AdversarialLoss(KDLoss):
    label = "adversarial"

    def __init__(
        self,
        feature: Literal["hidden", "output"],
        feature_width: int,
        hidden_dims: Sequence[int] = (256,),
        pairs: Sequence[tuple[int, int]] = (),
        student_width: int | None = None,
        capture_temperature: float = 1.0,
        disc_lr: float = 1e-4,
        disc_weight_decay: float = 0.0,
        disc_betas: tuple[float, float] = (0.5, 0.999),
        disc_warmup_steps: int = 0,
        disc_steps_per_step: int = 1,
        gradient_penalty: float | None = None,
    ):
        super().__init__()
        self.feature = feature
        self.pairs = tuple((int(s), int(t)) for s, t in pairs)
        self.capture_temperature = float(capture_temperature)
        self.disc_steps = int(disc_steps_per_step)
        self.gradient_penalty = gradient_penalty
        self.projections: nn.ModuleList | None = None
        if feature == "hidden":
            if not self.pairs:
                raise LossConfigError("loss 'adversarial': the layer map pairs no layers")
            self.needs = frozenset({"hidden_states"})
            self.fields = (*dict.fromkeys(f"hidden_{t}" for _, t in self.pairs), "valid")
            if student_width is not None and student_width != feature_width:
                self.projections = nn.ModuleList(nn.Linear(student_width, feature_width) for _ in self.pairs)
        else:
            self.needs = frozenset({"logits"})
            self.fields = TOPK_FIELDS
        discs = nn.ModuleList(Discriminator(feature_width, hidden_dims) for _ in range(max(1, len(self.pairs))))
        self._aux = (discs,)  # a tuple: outside the module tree (see the module docstring)
        self.disc_optimizer = torch.optim.AdamW(discs.parameters(), lr=disc_lr, betas=disc_betas,
                                                weight_decay=disc_weight_decay)
        self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(self.disc_optimizer, _WarmUp(disc_warmup_steps))

    @property
    def discriminators(self) -> nn.ModuleList:
        return self._aux[0]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AdversarialLoss:
        super()._apply(fn, recurse)
        self.discriminators._apply(fn, recurse)  # in place: the discriminator optimizer keeps its parameters
        return self

    # ------------------------------------------------------------ features

    def _features(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(teacher, student) features [B,T,D], one pair per discriminator; 0 at masked positions."""
        mask = kd_mask(batch)[..., None]
        if self.feature == "output":
            lt, ls, _ = coarse_pair(student.logits, batch, self.capture_temperature, 1.0, self.label)
            return [(lt, ls)]
        require(student, "hidden_states", self.label)
        hidden = student.hidden_states
        assert hidden is not None
        out = []
        for i, (s, t) in enumerate(self.pairs):
            if s >= len(hidden):
                raise ValueError(f"loss {self.label!r}: student hidden state {s} requested, the student gave {len(hidden)}")
            hs = hidden[s].float()
            if self.projections is not None:
                hs = self.projections[i](hs).float()
            ht = batch_field(batch, f"hidden_{t}", self.label).to(hs.dtype)
            out.append((torch.where(mask, ht, 0.0), torch.where(mask, hs, 0.0)))
        return out

    # ------------------------------------------------------------ the discriminator's step

    def auxiliary_step(self, student: StudentOutputs, batch: Mapping[str, Tensor],
                       sync_grads: GradSync | None = None) -> dict[str, Tensor]:
        """`disc_steps_per_step` discriminator updates on this batch's detached features."""
        mask = kd_mask(batch)
        device = mask.device.type
        with torch.autocast(device, enabled=False), torch.no_grad():
            features = [(t.detach().float(), s.detach().float()) for t, s in self._features(student, batch)]
        params = [p for g in self.disc_optimizer.param_groups for p in g["params"]]
        for _ in range(self.disc_steps):
            self.disc_optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, enabled=False):
                parts = [discriminator_loss(d, t, s, mask, self.gradient_penalty)
                         for d, (t, s) in zip(self.discriminators, features, strict=True)]
                loss = torch.stack([p[0] for p in parts]).mean()
                acc = torch.stack([p[1] for p in parts]).mean()
            try:
                check_finite(LossResult(loss, {"adv_d": loss.detach()}), batch)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"adversarial discriminator diverged (lower disc_lr or set gradient_penalty): {exc}") from None
            loss.backward()
            if sync_grads is not None:
                sync_grads(params)
            self.disc_optimizer.step()
            self.disc_scheduler.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {"adv_d": loss.detach(), "disc_acc": acc}

    def aux_state_dict(self) -> dict[str, Any]:
        return {"discriminators": self.discriminators.state_dict(), "optimizer": self.disc_optimizer.state_dict(),
                "scheduler": self.disc_scheduler.state_dict()}

    def load_aux_state_dict(self, state: Mapping[str, Any]) -> None:
        self.discriminators.load_state_dict(state["discriminators"])
        self.disc_optimizer.load_state_dict(state["optimizer"])
        self.disc_scheduler.load_state_dict(state["scheduler"])

    # ------------------------------------------------------------ the student's loss

    def forward(self, student: StudentOutputs, batch: Mapping[str, Tensor]) -> LossResult:
        mask = kd_mask(batch)
        values = [masked_mean(F.softplus(-d(s.float(), frozen=True)), mask)
                  for d, (_, s) in zip(self.discriminators, self._features(student, batch), strict=True)]
        value = torch.stack(values).mean()
        return LossResult(value, {"adv_g": value.detach()})


# ---------------------------------------------------------------- config and registration


class AdversarialConfig(LossConfig):
    """Adversarial distillation: a discriminator with its own optimizer tells cached teacher
    features from the student's; the student gets the generator loss."""

    name: Literal["adversarial"] = Field(description="adversarial")
    feature: Literal["hidden", "output"] = Field("hidden", description="hidden states, or the coarsened output "
                                                 "distribution (top-k stores)")
    layer_map: LayerMapConfig | None = Field(None, description=f"feature: hidden only; {LAYER_MAP}; default \"last\"")
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field([256], min_length=1, description="the discriminator "
                                                           "MLP's hidden widths")
    disc_lr: float = Field(1e-4, gt=0, description="the discriminator's AdamW learning rate")
    disc_weight_decay: float = Field(0.0, ge=0, description="the discriminator's AdamW weight decay")
    disc_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.5, 0.999), description="the discriminator's AdamW betas")
    disc_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up of the discriminator (updates)")
    disc_steps_per_step: int = Field(1, ge=1, description="discriminator updates per training micro-batch")
    gradient_penalty: float | None = Field(None, gt=0, description="R1 weight γ (γ/2 · ‖∇D(teacher feature)‖²); "
                                           "null = off")

    @model_validator(mode="after")
    def _layer_map(self) -> AdversarialConfig:
        if self.feature == "output" and self.layer_map is not None:
            raise ValueError("layer_map applies to feature: hidden only (feature: output uses the top-k distribution)")
        return self


def adversarial_fields(cfg: AdversarialConfig, names: Sequence[str]) -> tuple[str, ...]:
    if cfg.feature == "output":
        return TOPK_FIELDS
    return (*alignment.hidden_fields(cfg.layer_map or "last", names), "valid")


@register_loss("adversarial", config=AdversarialConfig, fields=adversarial_fields,
               summary="discriminator on hidden / output features (own optimizer)",
               reads="hidden_<layer> of each mapped teacher layer, valid (feature: output: topk_ids, topk_logp, "
                     "topk_tail, valid)")
def build_adversarial(cfg: AdversarialConfig, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    disc = {k: getattr(cfg, k) for k in ("hidden_dims", "disc_lr", "disc_weight_decay", "disc_betas",
                                         "disc_warmup_steps", "disc_steps_per_step", "gradient_penalty")}
    if cfg.feature == "output":
        topk = store.spec.topk
        if topk is None:  # a sampled store: check_fields names the missing top-k fields first
            raise LossConfigError("loss 'adversarial' with feature: output needs a top-k store")
        return AdversarialLoss("output", topk.k + 1, capture_temperature=topk.temperature, **disc)
    dims = StudentDims.required(student, cfg.name)
    stored = alignment.stored_layers(store.field_names, "hidden")
    width = store.spec.hidden.width if store.spec.hidden is not None else dims.hidden_size
    pairs = alignment.resolve_layer_map(cfg.layer_map or "last", stored, dims.num_layers, "hidden")
    return AdversarialLoss("hidden", width, pairs=pairs, student_width=dims.hidden_size, **disc)
