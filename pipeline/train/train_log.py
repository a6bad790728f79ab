"""What a training run reports: one JSONL line per step (with the step's sample ids, so two runs
can be checked for the same batches), TensorBoard scalars where tensorboard is installed, and a
progress line every `log_every` steps. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_JSONL = "train_log.jsonl"


class TrainLog:
    """Open for the length of a run (a context manager); `record` takes one step's figures."""

    def __init__(self, out: Path, resumed_step: int, tensorboard: bool, enabled: bool = True):
        self.out, self.enabled = out, enabled
        self.jsonl = self.board = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        trim_log(out / LOG_JSONL, resumed_step)
        self.jsonl = open(out / LOG_JSONL, "a")
        self.board = _tensorboard(out) if tensorboard else None

    def record(self, entry: dict[str, Any], sample_ids: list[int]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({**entry, "sample_ids": sample_ids}) + "\n")
            self.jsonl.flush()
        if self.board is not None:
            for key, value in entry.items():
                if key != "step":
                    self.board.add_scalar(key, value, entry["step"])

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.board is not None:
            self.board.close()


def progress_line(entry: dict[str, Any], steps: int) -> str:
    parts = " ".join(f"{k}={v:.4g}" for k, v in entry.items() if k not in ("step", "lr", "tokens_per_s"))
    return f"step {entry['step']}/{steps} {parts} lr={entry['lr']:.3g} {entry['tokens_per_s']:,.0f} tok/s"


def trim_log(path: Path, step: int) -> None:
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
