"""Several devices on one machine (`runner.kind: processes`): one process per device, each pinned
to its own GPU (`runner.devices`), or `runner.workers` processes on CPU; the shards still to
compute are divided among them in turn. The `cache-teacher` flow runs one task per process.

Each process is started fresh (spawn: no CUDA state or threads copied from the parent), loads its
own teacher on its device, skips shards committed meanwhile, and runs the pipelined pass (forward
here, writes in its writer thread). A process that fails does not stop the others: every shard
they commit stays committed, its error is raised once all are done, and a re-run resumes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import torch

from pipeline.capture.pass_setup import open_writer, teacher_for
from pipeline.capture.shard_plan import ShardPlan
from pipeline.capture.teacher_pass import cache_pipelined
from pipeline.config import CacheConfig, RunnerConfig, parse_config


def divide(todo: list[ShardPlan], n: int) -> list[list[ShardPlan]]:
    """Shards in turn: process i takes todo[i], todo[i + n], ..."""
    return [todo[i::n] for i in range(n)]


def worker_devices(config: CacheConfig) -> list[int | None]:
    """One entry per process: its CUDA index, or None (teacher.device as configured)."""
    return list(config.runner.devices) if config.runner.devices else [None] * config.runner.workers


def pinned(config: CacheConfig, device: int | None) -> CacheConfig:
    """The config a worker runs: its own device, and no runner of its own."""
    teacher = config.teacher if device is None else config.teacher.model_copy(update={"device": f"cuda:{device}"})
    return config.model_copy(update={"teacher": teacher, "runner": RunnerConfig()})


def run_group(config: CacheConfig, device: int | None, plans: list[ShardPlan]) -> list[dict[str, Any]]:
    """Compute and commit `plans` in a fresh process pinned to `device`; the shards it committed."""
    label = "cpu" if device is None else f"cuda:{device}"
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(config.model_dump(), device, plans, send), name=f"kdcache-{label}")
    process.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:
        kind, payload = "error", RuntimeError(f"the teacher-pass worker on {label} exited with code "
                                              f"{process.exitcode} before reporting")
    finally:
        process.join()
    if kind == "error":
        raise payload
    return payload


def _worker(config_data: dict[str, Any], device: int | None, plans: list[ShardPlan], send: Any) -> None:
    label = "cpu" if device is None else f"cuda:{device}"
    try:
        if device is not None:
            torch.cuda.set_device(device)
        config = pinned(parse_config(config_data, CacheConfig, "cache config"), device)
        teacher = teacher_for(config)
        writer = open_writer(config, teacher)
        todo = [p for p in plans if writer.committed(p.shard_id) is None]  # a re-run: committed meanwhile
        results = cache_pipelined(teacher, writer, todo, config, lambda m: print(f"  [{label}] {m}", flush=True))
        send.send(("ok", [{**r, "worker": f"{label} pid {os.getpid()}"} for r in results]))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            send.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text
            send.send(("error", RuntimeError(f"{label}: {type(exc).__name__}: {exc}")))
    finally:
        send.close()


def groups(config: CacheConfig, todo: list[ShardPlan]) -> list[tuple[int | None, list[ShardPlan]]]:
    """(device, its shards) per worker process that has any."""
    devices = worker_devices(config)
    return [(d, g) for d, g in zip(devices, divide(todo, len(devices)), strict=True) if g]


def gather(outcomes: list[Callable[[], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Every group's results; the first failure raised once all have been read."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    for outcome in outcomes:
        try:
            results += outcome()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return results

