"""Peak memory of one `bench.train` mode, each in a fresh process of its own
(`python -m bench.train_memory --mode kd ...`, started by `bench.train`): a process's peak RSS
cannot be reset for the memory a previous mode left behind, so the modes do not share one."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.common import REPO, log, proc_status_kb, repo_env, reset_peak_rss, sync
from bench.train_steppers import MODES, make_trainer, unique_params

MEMORY_MODES = ("kd", "online")
MB = 1024 * 1024


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one mode in this (fresh) process.

    CPU: VmHWM from /proc/self/status, not `ru_maxrss`: Linux carries ru_maxrss over fork and
    exec, so a child started by a big parent would report the parent's size. The peak is read
    once after the trainer is built (building a teacher_layers student loads and copies the whole
    teacher for a moment, in both modes), then reset (clear_refs) to get the training peak alone.
    """
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        trainer = make_trainer(args.mode, args.store, tmp, args)
        gc.collect()
        out: dict[str, Any] = {"mode": args.mode, "device": str(trainer.device)}
        out["rss_after_build_mb"] = (proc_status_kb("VmRSS") or 0) / 1024
        out["build_peak_rss_mb"] = (proc_status_kb("VmHWM") or 0) / 1024
        reset = reset_peak_rss()
        if trainer.device.type == "cuda":
            out["cuda_after_build_mb"] = torch.cuda.memory_allocated(trainer.device) / MB
        batches = trainer.batches()
        for _ in range(args.memory_steps):
            trainer.train_step(batches)
        sync(trainer.device)
        hwm = (proc_status_kb("VmHWM") or 0) / 1024
        out["train_peak_rss_mb"] = hwm if reset else None  # None: the peak could not be reset
        out["process_peak_rss_mb"] = max(hwm, out["build_peak_rss_mb"])
        if trainer.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(trainer.device) / MB
        if trainer.teacher is not None:
            out["teacher_params"], out["teacher_bytes"] = unique_params(trainer.teacher.model)
        out["student_params"], out["student_bytes"] = unique_params(trainer.student.model)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def memory_in_subprocess(mode: str, store: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.train_memory", "--mode", mode, "--store", store,
           "--batch-size", str(args.batch_size), "--device", args.device, "--memory-steps", str(args.memory_steps),
           "--teacher", args.teacher, "--student-layers", str(args.student_layers), "--seed", str(args.seed),
           "--row-length", str(args.row_length), "--threads", str(args.threads)]
    if args.bf16 is not None:
        cmd += ["--bf16", args.bf16]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=repo_env())
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of mode {mode!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"memory {mode}: {result} ({time.perf_counter() - started:.0f} s)")
    return result


def peak_mb(m: dict[str, Any]) -> float:
    """The figure the target compares: CUDA peak allocated, else the whole process's peak RSS."""
    return m["cuda_peak_mb"] if "cuda_peak_mb" in m else m["process_peak_rss_mb"]


def print_memory(memory: dict[str, Any], args: argparse.Namespace, teacher_params: int, teacher_bytes: int) -> None:
    cuda = "cuda_peak_mb" in memory["kd"]
    print()
    print(f"Peak memory, each mode in its own process, build + {args.memory_steps} steps "
          f"({'CUDA max_memory_allocated' if cuda else 'peak RSS, VmHWM'}):")
    print()
    if cuda:
        print("| mode | after build MB | peak MB (target figure) | host peak RSS MB |")
        print("|---|---:|---:|---:|")
        for m in MEMORY_MODES:
            print(f"| {m} | {memory[m]['cuda_after_build_mb']:,.0f} | {peak_mb(memory[m]):,.0f} | "
                  f"{memory[m]['process_peak_rss_mb']:,.0f} |")
    else:
        print("| mode | RSS after build MB | peak while building MB | peak while training MB | process peak MB (target figure) |")
        print("|---|---:|---:|---:|---:|")
        for m in MEMORY_MODES:
            mm = memory[m]
            train_peak = f"{mm['train_peak_rss_mb']:,.0f}" if mm["train_peak_rss_mb"] is not None else "n/a"
            print(f"| {m} | {mm['rss_after_build_mb']:,.0f} | {mm['build_peak_rss_mb']:,.0f} | {train_peak} | "
                  f"{peak_mb(mm):,.0f} |")
    diff = peak_mb(memory["online"]) - peak_mb(memory["kd"])
    print()
    print(f"online − offline = {diff:,.0f} MB; teacher weights = {teacher_bytes / MB:,.0f} MB "
          f"({teacher_params / 1e6:.1f} M × {teacher_bytes // teacher_params} B): "
          f"{'met' if diff >= teacher_bytes / MB else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak memory of one bench.train mode, in this process.")
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--store", required=True)
    for flag, kind, default in (("--batch-size", int, 4), ("--device", str, "auto"), ("--memory-steps", int, 2),
                                ("--teacher", str, "default"), ("--student-layers", int, 6), ("--seed", int, 0),
                                ("--row-length", int, 256), ("--threads", int, os.cpu_count() or 1)):
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--bf16", choices=["on", "off"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_memory(args)))


if __name__ == "__main__":
    main()
