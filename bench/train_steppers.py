"""The steppers `bench.train` times: `kdcache train`'s step and the Hugging Face `KDTrainer`'s
(fused losses), each taking one optimizer step on a batch it is given, so that every mode's steps
interleave with the others' on the same batches.

`transformers.Trainer` has no public one-step call, so `HFStepper.step` takes what its inner loop
takes per optimizer step (transformers 5.x `_run_epoch`, gradient accumulation 1): `training_step`
(forward, kdcache loss, backward), the loop's NaN/inf check of the step's loss (a host read of it,
on by default: `logging_nan_inf_filter`) and its FLOP count, clipping, the optimizer (the default,
`adamw_torch_fused`: `kdcache train` runs the same fused AdamW), the schedule and `zero_grad`.
Left out: callbacks and the logging and saving checks, which do nothing at these settings.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import bench_trainer
from kdstore.torch_stream import POSITION_KEY, WORKER_KEY
from pipeline.train.trainer import Trainer

MODES: dict[str, dict[str, Any]] = {
    "ce": {"losses": [{"name": "ce"}]},
    "kd": {"losses": [{"name": "fkl"}]},
    "kd+ce": {"losses": [{"name": "fkl", "weight": 0.5}, {"name": "ce", "weight": 0.5}]},
    "online": {"losses": [{"name": "fkl"}], "online_teacher": "default"},
}
HF_MODES: dict[str, list[dict[str, Any]]] = {"hf-kd": [{"name": "fkl"}], "hf-ce": [{"name": "ce"}]}
ALL_MODES = [*MODES, *HF_MODES]


def make_trainer(mode: str, store: str, out: str, args: argparse.Namespace, layers: int | None = None) -> Trainer:
    """A fresh `Trainer` for `mode` on the bench student (the same seed, so the same init and rows)."""
    return bench_trainer(store=store, out=out, batch_size=args.batch_size, seed=args.seed, device=args.device,
                         student={"init": "teacher_layers", "teacher": args.teacher,
                                  "num_layers": layers or args.student_layers},
                         bf16=None if args.bf16 is None else args.bf16 == "on", **MODES[mode])


class KdcacheStepper:
    """`kdcache train`'s step (`Trainer.step_on_device`: components stay on the device between log
    steps) on a given batch."""

    def __init__(self, mode: str, store: str, out: str, args: argparse.Namespace, layers: int):
        self.trainer = make_trainer(mode, store, out, args, layers)
        self.fused, self.student = self.trainer.fused, self.trainer.student

    def batches(self, n: int) -> list[dict[str, Any]]:
        """The first `n` batches of the trainer's own stream."""
        return [batch for _, batch in zip(range(n), self.trainer.batches(), strict=False)]

    def step(self, batch: dict[str, Any]) -> None:
        self.trainer.step_on_device(iter([dict(batch)]))  # a copy: the online mode adds teacher fields

    def read_log(self) -> None:
        self.trainer.read_log()


class HFStepper:
    """One `KDTrainer` (fused) on the bench student of `layers` teacher layers, set up as
    `make_trainer`'s: the same seed (so the same rows, in the same order), learning rate, clipping
    and schedule (cosine to 0.1 of the peak, no warm-up)."""

    def __init__(self, mode: str, store: str, out: str, args: argparse.Namespace, layers: int):
        from transformers import TrainingArguments

        from kdstore.reader import StoreReader
        from pipeline.train.hf_trainer import KDTrainer
        from pipeline.train.student import StudentConfig, build_student

        reader = StoreReader(store)
        torch.manual_seed(args.seed)
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        student = build_student(StudentConfig(init="teacher_layers", teacher=args.teacher, num_layers=layers), reader,
                                False, "cuda" if cuda else "cpu")
        bf16 = args.bf16 == "on" if args.bf16 is not None else cuda
        targs = TrainingArguments(output_dir=out, max_steps=10_000, per_device_train_batch_size=args.batch_size,
                                  learning_rate=3e-4, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
                                  lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                                  use_cpu=not cuda, bf16=bf16, seed=args.seed, report_to=[], save_strategy="no",
                                  disable_tqdm=True, dataloader_num_workers=0, logging_strategy="no")
        self.trainer = KDTrainer(model=student.model, args=targs, kd_store=reader, kd_losses=HF_MODES[mode])
        self.trainer.create_optimizer_and_scheduler(num_training_steps=targs.max_steps)
        self.trainer.current_gradient_accumulation_steps = 1  # the inner loop sets it per step
        self.model = self.trainer.model
        self.model.train()
        self.fused = self.trainer.kd.fused
        self.student = student

    def batches(self, n: int) -> list[dict[str, Any]]:
        """The first `n` batches of the trainer's own loader (StoreRows + KDCollator, placed by
        Accelerate), in its first epoch."""
        loader = iter(self.trainer.get_train_dataloader())
        out = [batch for _, batch in zip(range(n), loader, strict=False)]
        if len(out) < n:
            raise ValueError(f"the store gives {len(out)} batches per epoch; the bench asked for {n}")
        return out

    def step(self, batch: dict[str, Any]) -> None:
        """One optimizer step on `batch`, as the Trainer's inner loop takes it (see the module doc)."""
        trainer = self.trainer
        loss = trainer.training_step(self.model, dict(batch))
        if trainer.args.logging_nan_inf_filter and (torch.isnan(loss) or torch.isinf(loss)):
            raise FloatingPointError("hf step: loss not finite")
        trainer.current_flos += float(trainer.floating_point_ops(batch))
        trainer.accelerator.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        self.model.zero_grad()

    def read_log(self) -> None:
        """Read the pending loss components from the device (as a logging step does)."""
        _ = self.trainer.kd_history


def unique_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes), tied weights once."""
    params = list(model.parameters())  # nn.Module dedups shared parameters
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def same_batches(pools: dict[str, list[dict[str, Any]]]) -> bool:
    """Every mode's batches hold the same rows, and equal tensors in the fields they share."""
    ref = pools["kd"]
    for pool in pools.values():
        if len(pool) != len(ref):
            return False
        for a, b in zip(pool, ref, strict=True):
            for k in (set(a) & set(b)) - {WORKER_KEY, POSITION_KEY}:
                x, y = a[k], b[k]
                if isinstance(x, torch.Tensor) and not (x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())):
                    return False
    return True
