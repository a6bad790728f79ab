"""The trainer's config (one pydantic model; YAML values in configs/) and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator, model_validator

from pipeline.config import Strict
from pipeline.train.losses import LossConfig, import_loss_modules, parse_loss_config
from pipeline.train.student import StudentConfig


class TrainConfig(Strict):
    store: str
    # multi-teacher: stores of teachers 1..n over the same corpus (teacher 0 = `store`), joined by
    # sample id; their fields reach the losses as t<i>/<field> (see the `multi_teacher` loss)
    extra_stores: list[str] = []
    out: str
    student: StudentConfig = StudentConfig()
    loss_modules: list[str] = Field([], description=(
        "modules that register plugin losses (@register_loss, docs/guides/add-a-loss.md): dotted module names, "
        "or .py files relative to the working directory; imported before `losses` is read"))
    losses: SerializeAsAny[LossConfig] | list[SerializeAsAny[LossConfig]] = Field(
        [{"name": "fkl"}], validate_default=True,
        description="one loss config or a list of them (a weighted sum); each `name` is a registered loss")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)
    # passes over the store a run may take: None cycles it as often as `steps` need; a number makes
    # a run whose steps × batch_size × grad_accum (× ranks) exceed rows × epochs an error before step 1
    epochs: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    clip: float | None = 1.0
    seed: int = 0
    buffer_rows: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    device: str = "auto"
    # CPU threads (torch.set_num_threads). Float results depend on it, so a checkpoint records it
    # and a resumed run with threads unset takes the recorded count, computing bit for bit what
    # the straight run would have. Unset on a new run: torch's default (cores or OMP_NUM_THREADS).
    threads: int | None = Field(None, ge=1)
    # bfloat16 autocast. None: on for CUDA. "auto": also on a CPU with AMX tiles (native bf16
    # matmuls: 1.6-2x fp32 on this machine's Xeon; without them bf16 is emulated, slower)
    bf16: bool | Literal["auto"] | None = None
    compile: bool = False
    # under torchrun: ddp (a whole student per rank) or fsdp (FSDP2 fully_shard: parameters,
    # gradients and optimizer state sharded over the ranks; see pipeline/train/fsdp.py)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # output losses (fkl..., sampled_kd, ce and sums of them) from the student's last hidden state
    # and head, chunk by chunk, never whole logits (pipeline.train.losses.fused); other losses,
    # online_full_logits and heads that are not a plain linear layer keep whole logits anyway
    fused_loss: bool = True
    on_corrupt_shard: Literal["stop", "skip"] = "stop"
    online_teacher: str | None = None  # online-KD baseline: this teacher resident, same losses
    # online only: feed distribution losses the teacher's full distribution (dense divergence)
    # instead of the store's top-k + tail: the full-logit KD reference the cache is measured by
    online_full_logits: bool = False
    tensorboard: bool = True
    # cross-tokenizer: the longest student row (student tokens of one store row); default 2 × row_length
    student_row_length: int | None = Field(None, ge=2)

    @field_validator("losses", mode="before")
    @classmethod
    def _losses(cls, value: Any, info: ValidationInfo) -> Any:
        import_loss_modules(info.data.get("loss_modules", []))
        return parse_loss_config(value)

    @model_validator(mode="after")
    def _online_full(self) -> TrainConfig:
        if self.online_full_logits and not self.online_teacher:
            raise ValueError("online_full_logits needs online_teacher (the resident teacher whose logits it uses)")
        if (self.extra_stores or self.online_teacher) and self.student.tokenizer is not None:
            raise ValueError("student.tokenizer (cross-tokenizer distillation) works from one cached store: "
                             "no extra_stores, no online_teacher")
        if self.extra_stores and self.online_teacher:
            raise ValueError("extra_stores (cached teachers joined by sample id) cannot be used with online_teacher")
        return self


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
