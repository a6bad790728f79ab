"""Sharded students (`parallel: fsdp`): FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

DDP keeps a whole copy of the student on every rank; a student that does not fit on one device
needs its parameters, gradients and optimizer state sharded over the ranks. Each decoder layer
(the model's `_no_split_modules` classes) is one FSDP unit, the root holds the embeddings and
head. Checkpoints stay one plain file (`checkpoint.pt`, the same layout as unsharded runs):
every rank takes part in gathering the full model and optimizer state
(`torch.distributed.checkpoint.state_dict`, full_state_dict), rank 0 writes it, and a resumed run
shards it again, so resume is exact. Works on CPU with gloo (tested with 2 ranks) and on GPUs
with NCCL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError


def shard_student(model: torch.nn.Module, loss: torch.nn.Module) -> None:
    """fully_shard each decoder layer, then the root; refuses what the sharded step cannot do yet."""
    from torch.distributed.fsdp import fully_shard

    if "output_head" in getattr(loss, "needs", ()):
        raise ConfigError("parallel: fsdp: losses that read the student's output head (dskd, dskd_cma) "
                          "need the whole head on every rank; use parallel: ddp")
    if any(p.requires_grad for p in loss.parameters()):
        raise ConfigError("parallel: fsdp: losses with parameters of their own (projections, discriminators) "
                          "are not sharded; use parallel: ddp")
    units = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise ConfigError(f"parallel: fsdp: {type(model).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU on rank 0 (empty elsewhere); a collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state (keyed by parameter name) on rank 0; a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Shard a full model + optimizer state (as saved above) onto this rank; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())


def save_sharded_student(model: Any, tokenizer: Any, out: Path, rank: int) -> None:
    """save_pretrained of the gathered model (rank 0 writes); a collective."""
    state = full_model_state(model)
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
