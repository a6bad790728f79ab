"""What every benchmark shares: progress logging, device sync, and peak-memory readings.

Benchmarks print tables and, as the last line of stdout, one JSON object; progress goes to
stderr through `log`, so `python -m bench.NAME | tail -1` stays machine-readable.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


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


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
