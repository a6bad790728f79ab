"""What every benchmark shares: progress logging, device sync, and peak-memory readings.

Benchmarks print tables and, as the last line of stdout, one JSON object; progress goes to
stderr through `log`, so `python -m bench.NAME | tail -1` stays machine-readable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def log(msg: str, prefix: str = "") -> None:
    """One progress line on stderr."""
    print(f"[{prefix}] {msg}" if prefix else msg, file=sys.stderr, flush=True)


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def repo_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, for child processes
    that run `python -m bench.NAME` or `python -m flows.cli` from this checkout."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def bench_trainer(**fields: Any) -> Any:
    """A Trainer for a benchmark, its student in train mode: no checkpoints along the run, no
    TensorBoard, no progress lines; `fields` are TrainConfig's (steps 10,000 and no warm-up unless
    given: step benchmarks stop when they have their timings)."""
    from pipeline.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(**{"steps": 10_000, "warmup_steps": 0, "checkpoint_every": 10**9, "log_every": 10**9,
                         "tensorboard": False, **fields})
    trainer = Trainer(cfg)
    trainer.student.model.train()
    return trainer


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
