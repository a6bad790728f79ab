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
from kdstore.join import check_aligned
from kdstore.reader import StoreReader
from kdstore.torch_stream import KDLoader, KDStream
from pipeline.capture.model_head import LastHidden, fusable_head
from pipeline.config import ConfigError, parse_config
from pipeline.train.checkpoint import CHECKPOINT, Resumable, load_checkpoint, save_checkpoint
from pipeline.train.cross_tokenizer import STORE_FIELDS, retokenizer
from pipeline.train.fsdp import save_sharded_student, shard_student
from pipeline.train.losses import (
    NonFiniteLossError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    auxiliary_losses,
    auxiliary_steps,
    build_loss,
    check_cross_tokenizer,
    check_fields,
    check_finite,
    fold_loss_mask,
    required_fields,
)
from pipeline.train.online_teacher import online_spec, online_teacher_fields
from pipeline.train.student import build_student
from pipeline.train.train_config import TrainConfig, lr_factor
from pipeline.train.train_log import TrainLog, progress_line

__all__ = ["CHECKPOINT", "TrainConfig", "Trainer", "lr_factor", "train"]


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
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.reader = StoreReader(cfg.store)
        self.extra_readers = [StoreReader(s) for s in cfg.extra_stores]
        check_aligned([self.reader, *self.extra_readers])  # multi-teacher: stores line up, before any step
        store_info = StoreInfo.joined([self.reader, *self.extra_readers])
        cross = check_cross_tokenizer(cfg.losses, cfg.student.tokenizer is not None)
        check_loss_masks(self.reader, self.extra_readers, cross)
        # Field check before the student is built (the losses themselves need the student's sizes).
        check_fields(cfg.losses, store_info.field_names)
        needs_attentions = any(f.startswith("attn_") for f in required_fields(cfg.losses, store_info.field_names))
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
        if self.reader.spec.loss_mask:  # a chat store: every loss counts the assistant's tokens only
            fields = sorted({*fields, "loss_mask"})
        self.stream = KDStream(self.reader, fields, cfg.batch_size, seed=cfg.seed, buffer_rows=cfg.buffer_rows,
                               rank=self.rank, world_size=self.world,
                               on_corrupt="skip" if cfg.on_corrupt_shard == "skip" else "raise",
                               joined=self.extra_readers)
        self.loader = KDLoader(self.stream, num_workers=cfg.num_workers)
        self.sharded = cfg.parallel == "fsdp" and self.world > 1  # FSDP2: before the optimizer sees the params
        if self.sharded:
            shard_student(model, self.loss)
        # fused output losses read the head's weight outside the forward: not with a sharded head
        self.fused = not self.sharded and self._fuse(cfg, model)
        params = [p for p in list(model.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        # fused output losses: the base model's last hidden state, the head applied by the losses
        self.forward_model = LastHidden(model) if self.fused else model
        if self.world > 1 and not self.sharded:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.forward_model)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step = 0
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

    def _fuse(self, cfg: TrainConfig, model: Any) -> bool:
        """Whether the losses run fused (no whole logits): every loss can, and the head allows it."""
        if not (cfg.fused_loss and self.loss.fusable and not cfg.online_full_logits and not self.aux_losses):
            return False
        if self.loss.needs - {"logits", "output_head"}:
            return False
        why = fusable_head(model, getattr(model.config, "vocab_size", None))
        if why is not None and self.rank == 0:
            print(f"fused output losses off: the student's {why}; computing whole logits", flush=True)
        return why is None

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
                batch.update(online_teacher_fields(self.teacher, self.online_spec, batch["input_ids"],
                                                   cfg.online_full_logits))
            if self.retokenize is not None:
                batch = self.retokenize(batch)
                components["truncated_tokens"] = components.get("truncated_tokens", 0.0) + float(batch.pop("truncated_tokens"))
            batch = fold_loss_mask({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
            sync = self._average_grads if self.world > 1 else None
            try:
                with autocast:
                    head = self.student.model.get_output_embeddings().weight
                    if self.fused:  # no [tokens, V] logits: the losses apply the head chunk by chunk
                        student = StudentOutputs(None, output_head=head, last_hidden=model(batch["input_ids"]))
                    else:
                        out = model(input_ids=batch["input_ids"], output_hidden_states="hidden_states" in needs,
                                    output_attentions="attentions" in needs, use_cache=False)
                        student = StudentOutputs(out.logits, out.hidden_states, out.attentions, head)
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
        """Whether steps run under bfloat16 autocast (resolved once, at start-up)."""
        if self.cfg.bf16 == "auto":
            amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
            return self.device.type == "cuda" or (self.device.type == "cpu" and bool(amx()))
        return self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"

    def train(self, progress: bool = True, on_step: Callable[[Trainer, dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
        """Train to `cfg.steps`; `on_step(trainer, record)` runs after every step (an evaluation hook:
        held-out scoring every N steps, early stopping by raising), with the step's log record."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.student.model.train()
        batches = self.batches()
        started, window_tokens, last = time.perf_counter(), 0, {}
        with TrainLog(self.out, self.step, cfg.tensorboard, enabled=self.rank == 0) as log:
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
                log.record(last, sample_ids)
                if progress and self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    print(progress_line(last, cfg.steps), flush=True)
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


def check_loss_masks(reader: StoreReader, extra: list[StoreReader], cross: bool) -> None:
    """A chat store's loss mask reaches every loss through the primary store's rows; refuse what
    cannot honour it: a student with another tokenizer (its re-tokenised rows carry no mask), or
    a join of stores that disagree on having one."""
    if not reader.spec.loss_mask:
        if masked := [r.location.url for r in extra if r.spec.loss_mask]:
            raise ConfigError(f"store {masked[0]!r} has a chat loss_mask but the primary store {reader.location.url!r} "
                             "has none: list the chat store first so its mask applies to every teacher")
        return
    if cross:
        raise ConfigError(f"store {reader.location.url!r} is a chat store (a loss_mask over assistant tokens): a student "
                         "with its own tokenizer cannot carry that mask over; use the teacher's tokenizer")


def train(config: dict[str, Any] | TrainConfig, progress: bool = True) -> dict[str, Any]:
    cfg = config if isinstance(config, TrainConfig) else parse_config(config, TrainConfig, "train config")
    return Trainer(cfg).train(progress)
