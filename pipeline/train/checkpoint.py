"""Checkpoints: everything a resumed run needs to take exactly the batches the uninterrupted run
would have taken: model, optimizer, scheduler, the losses' own state (a discriminator and its
optimizer), each rank's stream position and every RNG. Written to a temporary name and renamed,
so a kill mid-save keeps the previous checkpoint.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.train.fsdp import full_model_state, full_optimizer_state, load_full_state

CHECKPOINT = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume from (other ranks, workers or losses)."""


@dataclass(frozen=True, eq=False)
class Resumable:
    """The parts of a run whose state a checkpoint holds."""

    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    aux_losses: list[Any]
    loader: Any  # KDLoader: state_dict / load_state_dict of the stream position
    sharded: bool = False  # FSDP2: model + optimizer state gathered in full / re-sharded (collectives)


def load_checkpoint(out: Path, parts: Resumable, rank: int, world: int, num_workers: int,
                    adopt_threads: bool = True) -> int | None:
    """Restore `parts` and the RNGs from `out/checkpoint.pt`; the step it was saved at, or None.
    With `adopt_threads` the CPU thread count is set to the one the checkpoint's run used: float
    results depend on it, and this is what makes a resumed run bitwise equal to a straight one."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["stream"]
    streams = saved if isinstance(saved, list) else [saved]
    if len(streams) != world:
        raise CheckpointError(f"checkpoint {path} was saved by {len(streams)} rank(s), this run has world size "
                         f"{world}: resume with the same number of ranks (the stream position is per rank)")
    stream_state = streams[rank]
    saved_workers = int(stream_state["num_workers"])  # data streams per rank: num_workers 0 and 1 both give 1
    if stream_state["consumed"] and saved_workers != max(1, num_workers):
        was = "0 or 1" if saved_workers == 1 else saved_workers
        raise CheckpointError(f"checkpoint {path} was saved with {saved_workers} data stream(s) per rank (num_workers {was}), "
                         f"this run has num_workers={num_workers}: resume with the same num_workers")
    if parts.sharded:
        load_full_state(parts.model, parts.optimizer, state["model"], state["optimizer"])
    else:
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.loss.load_state_dict(state["loss"])
    parts.scheduler.load_state_dict(state["scheduler"])
    aux = state.get("aux", [])
    if len(aux) != len(parts.aux_losses):
        raise CheckpointError(f"checkpoint {path} holds {len(aux)} auxiliary loss state(s) (discriminators), this run's "
                         f"losses have {len(parts.aux_losses)}: resume with the losses it was saved with")
    for loss, aux_state in zip(parts.aux_losses, aux, strict=True):
        loss.load_aux_state_dict(aux_state)
    parts.loader.load_state_dict(stream_state)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if adopt_threads and state.get("threads") and state["threads"] != torch.get_num_threads():
        torch.set_num_threads(int(state["threads"]))
    return int(state["step"])


def save_checkpoint(out: Path, parts: Resumable, step: int, config: dict[str, Any], rank: int, world: int) -> Path:
    """Gather every rank's stream position; rank 0 writes the checkpoint."""
    stream_state = parts.loader.state_dict()
    if parts.sharded:  # every rank takes part in gathering; rank 0 gets the full state
        model_state, optimizer_state = full_model_state(parts.model), full_optimizer_state(parts.model, parts.optimizer)
    else:
        model_state, optimizer_state = parts.model.state_dict(), parts.optimizer.state_dict()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, stream_state)
        stream_state = gathered
    if rank != 0:
        return out / CHECKPOINT
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model_state,
        "loss": parts.loss.state_dict(),
        "optimizer": optimizer_state,
        "scheduler": parts.scheduler.state_dict(),
        "aux": [loss.aux_state_dict() for loss in parts.aux_losses],
        "stream": stream_state,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "step": step,
        "threads": torch.get_num_threads(),
        "config": config,
    }
    tmp = out / f"{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)
    return out / CHECKPOINT
