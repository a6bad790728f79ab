"""The student trainer: streams the store, computes the configured losses, checkpoints, resumes.

No teacher in memory (unless `online_teacher` asks for the online-KD baseline, which feeds the
same losses from live teacher outputs). A checkpoint holds model, optimizer, scheduler, the
losses' auxiliary state (an adversarial discriminator with its own optimizer), the stream's
position and every RNG, so a resumed run takes exactly the batches the uninterrupted
run would have taken. Under `torchrun` each rank streams its own part of the store (DDP).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from kdstore.errors import CorruptShardError
from kdstore.join import check_aligned
from kdstore.reader import StoreReader
from kdstore.torch_stream import KDLoader, KDStream
from pipeline.config import Strict, parse_config
from pipeline.cross_tokenizer import STORE_FIELDS, check_cross_tokenizer, retokenizer
from pipeline.losses import (
    NonFiniteLossError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    auxiliary_losses,
    auxiliary_steps,
    build_loss,
    check_fields,
    check_finite,
    required_fields,
)
from pipeline.losses.output import TEACHER_LOGP
from pipeline.student import StudentConfig, build_student

CHECKPOINT = "checkpoint.pt"


class TrainConfig(Strict):
    store: str
    # multi-teacher: stores of teachers 1..n over the same corpus (teacher 0 = `store`), joined by
    # sample id; their fields reach the losses as t<i>/<field> (see the `multi_teacher` loss)
    extra_stores: list[str] = []
    out: str
    student: StudentConfig = StudentConfig()
    losses: Any = [{"name": "fkl"}]
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)
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
    bf16: bool | None = None  # default: on for CUDA
    compile: bool = False
    on_corrupt_shard: Literal["stop", "skip"] = "stop"
    online_teacher: str | None = None  # online-KD baseline: this teacher resident, same losses
    # online only: feed distribution losses the teacher's full distribution (dense divergence)
    # instead of the store's top-k + tail: the full-logit KD reference the cache is measured by
    online_full_logits: bool = False
    tensorboard: bool = True
    # cross-tokenizer: the longest student row (student tokens of one store row); default 2 × row_length
    student_row_length: int | None = Field(None, ge=2)

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


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = _distributed()
        self.device = _device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.manual_seed(cfg.seed)
        self.reader = StoreReader(cfg.store)
        self.extra_readers = [StoreReader(s) for s in cfg.extra_stores]
        check_aligned([self.reader, *self.extra_readers])  # multi-teacher: stores line up, before any step
        store_info = StoreInfo.joined([self.reader, *self.extra_readers])
        # Field check before the student is built (the losses themselves need the student's sizes).
        check_fields(cfg.losses, store_info.field_names)
        needs_attentions = any(f.startswith("attn_") for f in required_fields(cfg.losses, store_info.field_names))
        cross = check_cross_tokenizer(cfg.losses, cfg.student.tokenizer is not None)
        self.student = build_student(cfg.student, self.reader, needs_attentions, str(self.device), cross)
        model = self.student.model
        dims = StudentDims.from_config(model.config, self.student.tokenizer)
        self.loss = build_loss(cfg.losses, store_info, dims).to(self.device)
        # a student with its own tokenizer: the store's rows are re-tokenised and aligned per batch
        self.retokenize = retokenizer(self.student.tokenizer, self.reader, cfg.student_row_length) if cross else None
        # losses with a part trained by their own optimizer (the adversarial discriminator): stepped
        # before the loss each micro-batch, checkpointed under "aux"; never in self.optimizer
        self.aux_losses = auxiliary_losses(self.loss)
        fields = sorted(set(self.loss.fields) | {"input_ids", "valid"} | (set(STORE_FIELDS) if cross else set()))
        if cfg.online_teacher:
            fields = ["input_ids", "valid", "doc_ids"]
        self.stream = KDStream(self.reader, fields, cfg.batch_size, seed=cfg.seed, buffer_rows=cfg.buffer_rows,
                               rank=self.rank, world_size=self.world,
                               on_corrupt="skip" if cfg.on_corrupt_shard == "skip" else "raise",
                               joined=self.extra_readers)
        self.loader = KDLoader(self.stream, num_workers=cfg.num_workers)
        params = [p for p in list(model.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.forward_model = model
        if self.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(model)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step = 0
        self.out = Path(cfg.out)
        self.teacher = None
        if cfg.online_teacher:
            from pipeline.teacher_pass import get_teacher

            attention = self.reader.spec.attention is not None  # eager attention to extract the maps
            self.teacher = get_teacher(cfg.online_teacher, None, str(self.device), "auto", attention, False)
        self._resume()

    # ------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["stream"]
        streams = saved if isinstance(saved, list) else [saved]
        if len(streams) != self.world:
            raise ValueError(f"checkpoint {path} was saved by {len(streams)} rank(s), this run has world size "
                             f"{self.world}: resume with the same number of ranks (the stream position is per rank)")
        stream_state = streams[self.rank]
        saved_workers = int(stream_state["num_workers"])  # data streams per rank: num_workers 0 and 1 both give 1
        if stream_state["consumed"] and saved_workers != max(1, self.cfg.num_workers):
            was = "0 or 1" if saved_workers == 1 else saved_workers
            raise ValueError(f"checkpoint {path} was saved with {saved_workers} data stream(s) per rank (num_workers {was}), "
                             f"this run has num_workers={self.cfg.num_workers}: resume with the same num_workers")
        self.student.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        aux = state.get("aux", [])
        if len(aux) != len(self.aux_losses):
            raise ValueError(f"checkpoint {path} holds {len(aux)} auxiliary loss state(s) (discriminators), this run's "
                             f"losses have {len(self.aux_losses)}: resume with the losses it was saved with")
        for loss, aux_state in zip(self.aux_losses, aux, strict=True):
            loss.load_aux_state_dict(aux_state)
        self.loader.load_state_dict(stream_state)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path:
        stream_state = self.loader.state_dict()
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, stream_state)
            stream_state = gathered
        if self.rank != 0:
            return self.out / CHECKPOINT
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.student.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "aux": [loss.aux_state_dict() for loss in self.aux_losses],
            "stream": stream_state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "step": self.step,
            "config": self.cfg.model_dump(),
        }
        tmp = self.out / f"{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)  # a kill mid-save keeps the previous checkpoint
        return self.out / CHECKPOINT

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
                raise RuntimeError(f"store {self.cfg.store!r} yields no rows to rank {self.rank}")

    def _teacher_fields(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from pipeline.teacher_pass import extract_signals

        spec = self.reader.spec
        with torch.inference_mode():
            result = self.teacher.model(input_ids=batch["input_ids"].to(self.teacher.device), use_cache=False,
                                        output_hidden_states=spec.hidden is not None,
                                        output_attentions=spec.attention is not None)
            arrays = extract_signals(result, spec, None)
            captured = spec.topk.temperature if spec.topk is not None else 1.0
            full = torch.log_softmax(result.logits.float() / captured, dim=-1) if self.cfg.online_full_logits else None
        fields = {k: torch.from_numpy(v) for k, v in arrays.items()}  # outside inference mode: autograd may save them
        if full is not None:
            fields[TEACHER_LOGP] = full.clone()  # a normal tensor (inference tensors cannot be saved for backward)
        return fields

    def train_step(self, batches) -> dict[str, Any]:
        cfg = self.cfg
        model = self.forward_model
        needs = self.loss.needs
        components: dict[str, float] = {}
        tokens = 0
        sample_ids: list[int] = []
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            sample_ids += batch["sample_id"].tolist()
            if self.teacher is not None:
                batch.update(self._teacher_fields(batch))
            if self.retokenize is not None:
                batch = self.retokenize(batch)
                components["truncated_tokens"] = components.get("truncated_tokens", 0.0) + float(batch.pop("truncated_tokens"))
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16())
            sync = self._average_grads if self.world > 1 else None
            try:
                with autocast:
                    out = model(input_ids=batch["input_ids"], output_hidden_states="hidden_states" in needs,
                                output_attentions="attentions" in needs, use_cache=False)
                    student = StudentOutputs(out.logits, out.hidden_states, out.attentions,
                                             self.student.model.get_output_embeddings().weight)
                    aux = auxiliary_steps(self.aux_losses, student, batch, sync)
                    result = self.loss(student, batch)
                check_finite(result, batch)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"step {self.step + 1}: {exc}") from exc
            (result.total / cfg.grad_accum).backward()
            for name, value in {**result.components, **aux}.items():
                components[name] = components.get(name, 0.0) + float(value) / cfg.grad_accum
            components["loss"] = components.get("loss", 0.0) + float(result.total.detach()) / cfg.grad_accum
            tokens += int(batch["valid"].sum())
        if self.world > 1:
            self._average_grads(self.loss.parameters())
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**components, "lr": lr, "tokens": tokens, "sample_ids": sample_ids}

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
        return self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"

    def train(self, progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            _trim_log(self.out / "train_log.jsonl", self.step)
        log = open(self.out / "train_log.jsonl", "a") if self.rank == 0 else None
        board = _tensorboard(self.out) if cfg.tensorboard and self.rank == 0 else None
        self.student.model.train()
        batches = self.batches()
        started, window_tokens, last = time.perf_counter(), 0, {}
        try:
            while self.step < cfg.steps:
                try:
                    stats = self.train_step(batches)
                except CorruptShardError as exc:
                    saved = self.save_checkpoint()
                    raise CorruptShardError(f"{exc}; training stopped at step {self.step}, checkpoint {saved} "
                                            "(set on_corrupt_shard: skip to train on without it)") from exc
                window_tokens += stats.pop("tokens")
                sample_ids = stats.pop("sample_ids")
                elapsed = time.perf_counter() - started
                last = {"step": self.step, "lr": stats.pop("lr"),
                        "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1), **stats}
                if log is not None:
                    log.write(json.dumps({**last, "sample_ids": sample_ids}) + "\n")
                    log.flush()
                if board is not None:
                    for key, value in last.items():
                        if key != "step":
                            board.add_scalar(key, value, self.step)
                if progress and self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    parts = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
                    print(f"step {self.step}/{cfg.steps} {parts} lr={last['lr']:.3g} "
                          f"{last['tokens_per_s']:,.0f} tok/s", flush=True)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self.save_checkpoint()
            if self.rank == 0:
                self.student.model.save_pretrained(self.out / "model")
                self.student.tokenizer.save_pretrained(self.out / "model")
        finally:
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        return {"out": str(self.out), "steps": self.step, "last": last, "student": self.student.origin}


def _trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (where a resumed run starts): lines written after
    the last checkpoint by a killed run, or torn by the kill, would otherwise appear twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and int(entry.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the JSONL log is enough
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(config: dict[str, Any] | TrainConfig, progress: bool = True) -> dict[str, Any]:
    cfg = config if isinstance(config, TrainConfig) else parse_config(config, TrainConfig, "train config")
    return Trainer(cfg).train(progress)
