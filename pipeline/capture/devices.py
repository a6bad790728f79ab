"""Which device a teacher runs on, checked before anything loads: indices the machine lacks, a
worker process's own GPU (one per process), placements that do not fit, and out-of-memory errors
turned into a line that names the key to change.

A worker of a Dask cluster claims its device by an exclusive lock on a file per device index
(`claim_device`), so the processes of one machine (a LocalCluster's, or `dask worker --nworkers N`)
each take a different GPU without any coordination; the lock lasts as long as the process.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import CacheConfig, DeviceError

_claimed: tuple[int, Any] | None = None  # (device, the open lock file), for the life of this process


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_index(index: int, key: str) -> None:
    """A CUDA device index the machine has, else one line naming `key` and what there is."""
    count = cuda_count()
    if not 0 <= index < count:
        there = f"{count} CUDA device(s) (0..{count - 1})" if count else "no CUDA device"
        raise DeviceError(f"{key}: cuda:{index} does not exist; this machine has {there}")


def check_device(device: str, key: str = "teacher.device") -> torch.device:
    """`device` as a torch.device (auto resolved), its CUDA index checked."""
    if device == "auto":
        return torch.device("cuda" if cuda_count() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{key}: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        check_index(0 if parsed.index is None else parsed.index, key)
    return parsed


def check_placement(device_map: Any, max_memory: Any) -> None:
    """The CUDA indices a device_map dict or max_memory names must exist."""
    named = list(device_map.values()) if isinstance(device_map, dict) else []
    named += [k for k in (max_memory or {}) if str(k) not in ("cpu", "disk")]
    for value in named:
        if isinstance(value, int) or str(value).isdigit():
            check_index(int(value), "teacher.device_map")
        elif str(value) not in ("cpu", "disk"):
            check_device(str(value), "teacher.device_map")


def check_runner_devices(config: CacheConfig) -> None:
    for index in config.runner.devices or []:
        check_index(index, "runner.devices")


def in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def claim_device(devices: list[int], lock_dir: str | None = None) -> int:
    """The first of `devices` no other process of this machine holds, held by this one from now on."""
    global _claimed
    if _claimed is not None:
        return _claimed[0]
    folder = Path(lock_dir or os.environ.get("KDCACHE_DEVICE_LOCKS") or tempfile.gettempdir())
    for index in devices:
        handle = open(folder / f"kdcache-device-{index}.lock", "a")  # noqa: SIM115 (held while the process lives)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _claimed = (index, handle)
        return index
    raise DeviceError(f"runner.devices {devices}: every device is taken by another kdcache worker on this machine "
                      "(one worker per device: as many workers as devices)")


def worker_device(config: CacheConfig) -> str:
    """The device this process's teacher runs on: with runner.devices, a Dask worker's own claimed
    GPU, or the first one for the flow's set-up; otherwise teacher.device."""
    devices = config.runner.devices
    if not devices:
        return config.teacher.device
    index = claim_device(devices) if in_dask_worker() else devices[0]
    check_index(index, "runner.devices")
    return f"cuda:{index}"


def check_fits(model: Any, device_map: Any) -> None:
    """A device_map that leaves modules on disk (or, with GPUs there, spills a string map onto the
    CPU) does not fit: refuse it rather than run a pass at disk or host speed."""
    placed = getattr(model, "hf_device_map", None) or {}
    spilled = {k: v for k, v in placed.items() if v == "disk" or (v == "cpu" and isinstance(device_map, str) and cuda_count())}
    if spilled or any(p.device.type == "meta" for p in model.parameters()):
        where = sorted({str(v) for v in spilled.values()}) or ["disk"]
        raise DeviceError(f"teacher.device_map {device_map!r} does not fit: {len(spilled) or 'some'} module(s) would go to "
                          f"{'/'.join(where)} ({cuda_count()} CUDA device(s) here); add devices, raise "
                          "teacher.max_memory, or use a smaller teacher or dtype")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in text and "memory" in text


def out_of_memory(shard: str, batch_size: int, device: Any) -> DeviceError:
    smaller = max(1, batch_size // 2)
    hint = f"set teacher.batch_size to {smaller} or less" if batch_size > 1 else "use a device with more memory or teacher.device_map"
    return DeviceError(f"shard {shard}: the teacher ran out of memory on {device} at teacher.batch_size {batch_size}; "
                       f"{hint} (committed shards are kept: a re-run resumes)")

