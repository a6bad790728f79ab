"""The student trainer: streams the store, computes the configured losses, checkpoints, resumes.

No teacher in memory (unless `online_teacher` asks for the online-KD baseline, which feeds the
same losses from live teacher outputs: `online_teacher`). Under `torchrun` each rank streams its
own part of the store (DDP, or FSDP2 with `parallel: fsdp`: `fsdp`). The config is
`train_config`, checkpoints are `checkpoint`, the step log is `train_log`; this module builds a
run and takes its steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdstore.errors import CorruptShardError, StoreError
from kdstore.torch_stream import KDLoader, KDStream
from pipeline.config import parse_config
from pipeline.train.checkpoint import CHECKPOINT, Resumable, load_checkpoint, save_checkpoint
from pipeline.train.core import (
    DeviceMeter,
    build_kd,
    check_kd_input,
    check_steps,
    fused_forward,
    needs_attentions,
    open_stores,
    prepare_batch,
    student_outputs,
)
from pipeline.train.fsdp import save_sharded_student, shard_student
from pipeline.train.losses import NonFiniteLossError, auxiliary_steps, check_cross_tokenizer
from pipeline.train.online_teacher import online_spec, online_teacher_fields
from pipeline.train.student import build_student
from pipeline.train.train_config import TrainConfig, lr_factor
from pipeline.train.train_log import TrainLog, progress_line

__all__ = ["CHECKPOINT", "TrainConfig", "Trainer", "lr_factor", "make_optimizer", "train"]


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `params`, with the fused kernel (one pass over each parameter instead of a dozen
    elementwise ops) wherever every parameter is a plain floating tensor on the CPU or a CUDA
    device, as the Hugging Face Trainer's default optimizer (`adamw_torch_fused`) runs it; sharded
    (DTensor) parameters take torch's default implementation."""
    fused = all(type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = _distributed()
        self.device = _device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        readers = open_stores(cfg.store, cfg.extra_stores)
        self.reader, self.extra_readers = readers[0], readers[1:]
        cross = check_cross_tokenizer(cfg.losses, cfg.student.tokenizer is not None)
        # the stores and the losses' fields are checked before the student is built (the losses
        # themselves need the student's sizes)
        info = check_kd_input(cfg.losses, readers, cross=cross)
        self.student = build_student(cfg.student, self.reader, needs_attentions(cfg.losses, info), str(self.device), cross)
        model = self.student.model  # build_student checked its tokenizer against the store's
        self.sharded = cfg.parallel == "fsdp" and self.world > 1  # FSDP2: before the optimizer sees the params
        # fused output losses read the head's weight outside the forward: not with a sharded head
        self.kd = build_kd(cfg.losses, readers, model, self.student.tokenizer if cross else None, info=info, cross=cross,
                           fused_loss=cfg.fused_loss and not cfg.online_full_logits, can_fuse=not self.sharded,
                           online=cfg.online_teacher is not None, student_row_length=cfg.student_row_length,
                           device=self.device)
        if cfg.fused_loss and self.kd.why_not_fused and not self.sharded and self.rank == 0:
            print(f"fused output losses off: {self.kd.why_not_fused}; computing whole logits", flush=True)
        self.loss, self.fused = self.kd.loss, self.kd.fused
        # losses with a part trained by their own optimizer (the adversarial discriminator): stepped
        # before the loss each micro-batch, checkpointed under "aux"; never in self.optimizer
        self.aux_losses = list(self.kd.aux_losses)
        self.stream = KDStream(self.reader, list(self.kd.fields), cfg.batch_size, seed=cfg.seed,
                               buffer_rows=cfg.buffer_rows, rank=self.rank, world_size=self.world,
                               on_corrupt="skip" if cfg.on_corrupt_shard == "skip" else "raise",
                               joined=self.extra_readers)
        check_steps(self._rank_rows(), cfg.steps, cfg.batch_size * cfg.grad_accum, cfg.epochs,
                    f"store {self.reader.location.url!r}" + (f" (rank {self.rank} of {self.world})" if self.world > 1 else ""))
        self.loader = KDLoader(self.stream, num_workers=cfg.num_workers)
        if self.sharded:
            shard_student(model, self.loss)
        params = [p for p in list(model.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        # fused output losses: the base model's last hidden state, the head applied by the losses
        self.forward_model = fused_forward(model) if self.fused else model
        if self.world > 1 and not self.sharded:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.forward_model)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step = 0
        self.meter = DeviceMeter()
        self.bf16 = self._bf16()
        self.out = Path(cfg.out)
        self.teacher = None
        if cfg.online_teacher:
            from pipeline.capture.pass_setup import get_teacher

            self.online_spec = online_spec(self.reader.spec, self.loss.fields)
            attention = self.online_spec.attention is not None  # eager attention to extract the maps
            self.teacher = get_teacher(cfg.online_teacher, None, str(self.device), "auto", attention, False)
        self.resumable = Resumable(model, self.loss, self.optimizer, self.scheduler, self.aux_losses, self.loader,
                                   sharded=self.sharded)
        self._resume()

    def _rank_rows(self) -> int:
        """Rows this rank reads per epoch (all its loader workers together)."""
        workers = max(1, self.cfg.num_workers)
        return sum(self.stream.worker_rows(self.rank * workers + w, self.world * workers) for w in range(workers))

    # ------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        step = load_checkpoint(self.out, self.resumable, self.rank, self.world, self.cfg.num_workers,
                               adopt_threads=self.cfg.threads is None)
        if step is not None:
            self.step = step

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.out, self.resumable, self.step, self.cfg.model_dump(), self.rank, self.world)

    # ------------------------------------------------------------ training

    def batches(self):
        empty_passes = 0
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            # A run resumed from a checkpoint taken at the very end of an epoch first finishes that
            # epoch (an empty pass); only a second empty pass in a row means there are no rows.
            empty_passes = 0 if yielded else empty_passes + 1
            if empty_passes >= 2:
                raise StoreError(f"store {self.cfg.store!r} yields no rows to rank {self.rank}")

    def step_on_device(self, batches) -> dict[str, Any]:
        """One optimizer step, with no host-device sync: the loss components stay on the device
        (`self.meter` holds them until `read_log`); tokens and sample ids are the host's counts."""
        cfg = self.cfg
        tokens = truncated = 0
        sample_ids: list[int] = []
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        sync = self._average_grads if self.world > 1 else None
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            if self.teacher is not None:
                batch.update(online_teacher_fields(self.teacher, self.online_spec, batch["input_ids"],
                                                   cfg.online_full_logits))
            prepared = prepare_batch(batch, self.device, self.kd.retokenize)
            batch = prepared.batch
            tokens, truncated, sample_ids = tokens + prepared.tokens, truncated + prepared.truncated_tokens, \
                sample_ids + prepared.sample_ids
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    student = student_outputs(self.kd, self.forward_model, self.student.model, batch["input_ids"])
                    aux = auxiliary_steps(self.aux_losses, student, batch, sync)  # own syncs: they step an optimizer
                    result = self.loss(student, batch)
            except NonFiniteLossError as exc:  # a diverged discriminator, found by its own step
                raise NonFiniteLossError(f"step {self.step + 1}: {exc}") from exc
            (result.total / cfg.grad_accum).backward()
            self.meter.add({**result.components, **aux, "loss": result.total}, 1.0 / cfg.grad_accum)
        if self.kd.retokenize is not None:
            self.meter.add({"truncated_tokens": float(truncated)})
        if self.world > 1:
            self._average_grads(self.loss.parameters())
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        values = self.meter.end_step({"step": self.step, "lr": lr}, sample_ids)
        return {**values, "lr": lr, "tokens": tokens, "sample_ids": sample_ids}

    def read_log(self) -> list[tuple[dict[str, Any], list[int]]]:
        """The pending steps' records (one sync), each (record, sample ids); a non-finite component
        raises `NonFiniteLossError` naming its step and sample ids."""
        return self.meter.read()

    def train_step(self, batches) -> dict[str, Any]:
        """One step, its components read at once (floats): for tests and scripts; `train` reads
        them every `log_every` steps instead."""
        stats = self.step_on_device(batches)
        record, _ = self.read_log()[-1]
        return {**stats, **record}

    def _average_grads(self, params) -> None:
        """DDP averages the student's gradients; the losses' own projections (and, from their
        auxiliary steps, the discriminators) are averaged over ranks here."""
        for p in params:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)

    def _bf16(self) -> bool:
        """Whether steps run under bfloat16 autocast (resolved once, at start-up)."""
        if self.cfg.bf16 == "auto":
            amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
            return self.device.type == "cuda" or (self.device.type == "cpu" and bool(amx()))
        return self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"

    def train(self, progress: bool = True, on_step: Callable[[Trainer, dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        """Train to `cfg.steps`; `on_step(trainer, record)` runs after every step (an evaluation hook:
        held-out scoring every N steps, early stopping by raising), with the step's log record.
        Without a hook the loss components are read from the device only every `log_every` steps
        and before each checkpoint (the log still has one line per step)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.student.model.train()
        batches = self.batches()
        started, window_tokens, last = time.perf_counter(), 0, {}
        with TrainLog(self.out, self.step, cfg.tensorboard, enabled=self.rank == 0) as log:
            while self.step < cfg.steps:
                try:
                    stats = self.step_on_device(batches)
                except CorruptShardError as exc:
                    self._write(log, progress=False)
                    saved = self.save_checkpoint()
                    raise CorruptShardError(f"{exc}; training stopped at step {self.step}, checkpoint {saved} "
                                            "(set on_corrupt_shard: skip to train on without it)") from exc
                window_tokens += stats["tokens"]
                self.meter.pending[-1].info["tokens_per_s"] = round(
                    window_tokens / max(time.perf_counter() - started, 1e-9), 1)
                # values are read (one sync, the finiteness check) at log steps and before a checkpoint;
                # an on_step hook gets every step's record, so it reads every step
                shown = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if shown or self.step % cfg.checkpoint_every == 0 or on_step is not None:
                    last = self._write(log, progress and shown) or last
                if on_step is not None:
                    on_step(self, last)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            if self.sharded:
                save_sharded_student(self.student.model, self.student.tokenizer, self.out / "model", self.rank)
            elif self.rank == 0:
                self.student.model.save_pretrained(self.out / "model")
                self.student.tokenizer.save_pretrained(self.out / "model")
        skipped = dict(sorted(self.stream.skipped.items()))  # on_corrupt_shard: skip
        return {"out": str(self.out), "steps": self.step, "last": last, "student": self.student.origin,
                "corrupt_shards_skipped": len(skipped), "corrupt_shards": skipped}

    def _write(self, log: TrainLog, progress: bool) -> dict[str, Any]:
        """Read the pending steps (one sync), write their log lines; the last step's record."""
        last: dict[str, Any] = {}
        for record, sample_ids in self.read_log():
            last = record
            log.record(record, sample_ids)
        if progress and last and self.rank == 0:
            print(progress_line(last, self.cfg.steps), flush=True)
        return last


def train(config: dict[str, Any] | TrainConfig, progress: bool = True) -> dict[str, Any]:
    cfg = config if isinstance(config, TrainConfig) else parse_config(config, TrainConfig, "train config")
    return Trainer(cfg).train(progress)
