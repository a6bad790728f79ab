"""Student training step: KD from the cache vs CE only vs online KD (teacher resident), same
student and batches, one run; plus the peak memory of offline and online KD.

    .venv/bin/python -m bench.train [--steps N] [--warmup W] [--batch-size 4] [--tokens 12288]
                                    [--device auto] [--quick]

Store: the real default teacher (SmolLM2-135M-Instruct) over the built-in corpus, top-64,
rows of 256, built once and reused from `$KDCACHE_BENCH_CACHE/train-store-<key>` (default
`<tmp>/kdcache-bench/`) while `verify_store` finds it clean. Student: 6 of the teacher's 30
layers, then (timing only) a smaller one, 2 layers by default (--small-student-layers), whose
online/offline arithmetic limit is above 2 (the teacher's forward weighs more against a cheaper
student step). The output losses run fused (last hidden state + head, no whole logits) in
every mode, as the trainer runs them. Modes, each a fresh `Trainer` with the same seed (so the same sample ids, checked):
`ce` (CE only), `kd` (fkl from the cache), `kd+ce`, `online` (fkl from the resident teacher);
and the same student through the Hugging Face `KDTrainer` (fused, same seed so the same rows):
`hf-kd` and `hf-ce`, each step its `training_step` (forward + loss + backward) then clipping,
AdamW and the schedule, as its inner loop does; its KD/CE ratio is reported next to `kdcache
train`'s (target: within 0.03).
Warm-up steps first, then rounds in which every mode takes one step, the order rotating each
round, so a noisy neighbour hits all modes alike; the median step is reported.
Peak memory: each of `kd` and `online` in its own process (`--mode X --measure-memory`).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.bench_stores import cached_store
from bench.common import log, proc_status_kb, reset_peak_rss, sync
from pipeline.train.trainer import TrainConfig, Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES: dict[str, dict[str, Any]] = {
    "ce": {"losses": [{"name": "ce"}]},
    "kd": {"losses": [{"name": "fkl"}]},
    "kd+ce": {"losses": [{"name": "fkl", "weight": 0.5}, {"name": "ce", "weight": 0.5}]},
    "online": {"losses": [{"name": "fkl"}], "online_teacher": "default"},
}
HF_MODES: dict[str, list[dict[str, Any]]] = {"hf-kd": [{"name": "fkl"}], "hf-ce": [{"name": "ce"}]}
ALL_MODES = [*MODES, *HF_MODES]
MEMORY_MODES = ("kd", "online")
MB = 1024 * 1024


def ensure_store(args: argparse.Namespace) -> str:
    """The bench store: top-64 over the built-in corpus, built once and reused while it verifies."""
    return cached_store("train-store", {
        "teacher": {"name": args.teacher},
        "corpus": {"kind": "builtin"},
        "row_length": args.row_length,
        "shard_rows": 16,
        "split": "train",
        "max_tokens": args.tokens,
        "signals": {"topk": {"k": 64}},
    })


# ---------------------------------------------------------------- trainers


def make_trainer(mode: str, store: str, out: str, args: argparse.Namespace, layers: int | None = None) -> Trainer:
    cfg = TrainConfig(
        store=store,
        out=out,
        student={"init": "teacher_layers", "teacher": args.teacher, "num_layers": layers or args.student_layers},
        batch_size=args.batch_size,
        grad_accum=1,
        steps=10_000,
        warmup_steps=0,
        seed=args.seed,
        checkpoint_every=1_000_000,
        device=args.device,
        bf16=None if args.bf16 is None else args.bf16 == "on",
        tensorboard=False,
        **MODES[mode],
    )
    trainer = Trainer(cfg)
    trainer.student.model.train()
    return trainer


class Recorder:
    """Wraps a trainer's batch iterator and records the sample ids it hands out."""

    def __init__(self, trainer: Trainer):
        self.inner = trainer.batches()
        self.ids: list[list[int]] = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.ids.append(batch["sample_id"].tolist())
        return batch


def timed(step: Callable[[], Any], device: torch.device) -> tuple[float, float, int]:
    """(wall s, process CPU s, tokens) of one training step."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = step()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, int(tokens)


def kdcache_step(trainer: Trainer, batches: Recorder) -> Callable[[], int]:
    """`kdcache train`'s step as `train` takes it (components stay on the device between log steps)."""
    return lambda: int(trainer.step_on_device(batches)["tokens"])


class HFStepper:
    """One `KDTrainer` (fused) on the bench student, stepped as its inner loop steps: `training_step`
    (forward, kdcache loss, backward), clipping, AdamW, the schedule, zero_grad."""

    def __init__(self, mode: str, store: str, out: str, args: argparse.Namespace, layers: int):
        from transformers import TrainingArguments

        from kdstore.reader import StoreReader
        from pipeline.train.hf_trainer import KDTrainer
        from pipeline.train.student import StudentConfig, build_student

        reader = StoreReader(store)
        torch.manual_seed(args.seed)
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        student = build_student(StudentConfig(init="teacher_layers", teacher=args.teacher, num_layers=layers), reader,
                                False, "cuda" if cuda else "cpu")
        bf16 = args.bf16 == "on" if args.bf16 is not None else cuda
        targs = TrainingArguments(output_dir=out, max_steps=10_000, per_device_train_batch_size=args.batch_size,
                                  learning_rate=3e-4, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
                                  use_cpu=not cuda, bf16=bf16, seed=args.seed, report_to=[], save_strategy="no",
                                  disable_tqdm=True, dataloader_num_workers=0, logging_strategy="no")
        self.trainer = KDTrainer(model=student.model, args=targs, kd_store=reader, kd_losses=HF_MODES[mode])
        self.trainer.create_optimizer_and_scheduler(num_training_steps=targs.max_steps)
        self.trainer.current_gradient_accumulation_steps = 1  # the inner loop sets it per step
        self.model = self.trainer.model
        self.model.train()
        self.loader = self.trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        self.device = self.trainer.args.device
        self.ids: list[list[int]] = []
        self.fused = self.trainer.kd.fused

    def step(self) -> torch.Tensor:
        """One step; its token count as a tensor (read after the timing: Accelerate puts the
        batch on the device already)."""
        batch = next(self.batches, None)
        if batch is None:  # the end of an epoch: the next one, as the Trainer's own loop would
            self.batches = iter(self.loader)
            batch = next(self.batches)
        self.ids.append(batch["sample_id"])
        tokens = batch["valid"].sum()
        self.trainer.training_step(self.model, batch)
        self.trainer.accelerator.clip_grad_norm_(self.model.parameters(), self.trainer.args.max_grad_norm)
        self.trainer.optimizer.step()
        self.trainer.lr_scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return tokens


def unique_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes), tied weights once."""
    params = list(model.parameters())  # nn.Module dedups shared parameters
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


# ---------------------------------------------------------------- memory (own process)


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one mode in this (fresh) process.

    CPU: VmHWM from /proc/self/status, not `ru_maxrss`: Linux carries ru_maxrss over fork and
    exec, so a child started by a big parent would report the parent's size. The peak is read
    once after the trainer is built (building a teacher_layers student loads and copies the whole
    teacher for a moment, in both modes), then reset (clear_refs) to get the training peak alone.
    """
    import gc

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        trainer = make_trainer(args.mode, args.store, tmp, args)
        gc.collect()
        out: dict[str, Any] = {"mode": args.mode, "device": str(trainer.device)}
        out["rss_after_build_mb"] = (proc_status_kb("VmRSS") or 0) / 1024
        out["build_peak_rss_mb"] = (proc_status_kb("VmHWM") or 0) / 1024
        reset = reset_peak_rss()
        if trainer.device.type == "cuda":
            out["cuda_after_build_mb"] = torch.cuda.memory_allocated(trainer.device) / MB
        batches = Recorder(trainer)
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
    cmd = [sys.executable, "-m", "bench.train", "--mode", mode, "--measure-memory", "--store", store,
           "--batch-size", str(args.batch_size), "--device", args.device, "--memory-steps", str(args.memory_steps),
           "--teacher", args.teacher, "--student-layers", str(args.student_layers), "--seed", str(args.seed),
           "--row-length", str(args.row_length), "--threads", str(args.threads)]
    if args.bf16 is not None:
        cmd += ["--bf16", args.bf16]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of mode {mode!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"memory {mode}: {result} ({time.perf_counter() - started:.0f} s)")
    return result


def peak_mb(m: dict[str, Any]) -> float:
    """The figure the target compares: CUDA peak allocated, else the whole process's peak RSS."""
    return m["cuda_peak_mb"] if "cuda_peak_mb" in m else m["process_peak_rss_mb"]


# ---------------------------------------------------------------- main


def time_student(store: str, args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """Every mode with a student of `layers` teacher layers: warm-up, then interleaved rounds."""
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        trainers, hf, steps, ids, times, cpu_times, tokens = {}, {}, {}, {}, {}, {}, {}
        for mode in ALL_MODES:
            t0 = time.perf_counter()
            if mode in MODES:
                trainers[mode] = make_trainer(mode, store, f"{tmp}/{mode}", args, layers)
                recorder = Recorder(trainers[mode])
                steps[mode], ids[mode], fused = kdcache_step(trainers[mode], recorder), recorder.ids, trainers[mode].fused
            else:
                hf[mode] = HFStepper(mode, store, f"{tmp}/{mode}", args, layers)
                steps[mode], ids[mode], fused = hf[mode].step, hf[mode].ids, hf[mode].fused
            times[mode], cpu_times[mode], tokens[mode] = [], [], []
            log(f"built trainer {mode} ({layers} layers, fused losses {fused}) in {time.perf_counter() - t0:.1f} s")
        device = trainers["kd"].device
        modes = list(ALL_MODES)
        for _ in range(args.warmup):
            for mode in modes:
                timed(steps[mode], device)
        for r in range(args.steps):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode in order:
                dt, cpu, n = timed(steps[mode], device)
                times[mode].append(dt)
                cpu_times[mode].append(cpu)
                tokens[mode].append(n)
            log(f"{layers} layers, round {r + 1}/{args.steps}: " + " ".join(f"{m}={times[m][-1] * 1e3:.0f}ms" for m in modes))
        student_params, student_bytes = unique_params(trainers["kd"].student.model)
        teacher_params, teacher_bytes = unique_params(trainers["online"].teacher.model)
        out = {
            "times": times, "cpu_times": cpu_times, "tokens": tokens, "device": device,
            "same_batches": all([list(map(int, b)) for b in ids[m]] == ids["kd"] for m in modes),
            "student_params": student_params, "student_bytes": student_bytes,
            "teacher_params": teacher_params, "teacher_bytes": teacher_bytes,
            "teacher_dtype": str(next(trainers["online"].teacher.model.parameters()).dtype).removeprefix("torch."),
            "student_origin": trainers["kd"].student.origin, "first_ids": ids["kd"][0],
            "hf_fused": all(h.fused for h in hf.values()),
        }
        del trainers, hf, steps
    return out


def ratio_figures(times: dict[str, list[float]], cpu_times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Ratio of medians (the target figure), of bests, median of per-round ratios, of CPU medians."""
    paired = statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
    return {"median": statistics.median(times[num]) / statistics.median(times[den]),
            "best": min(times[num]) / min(times[den]), "paired": paired,
            "cpu": statistics.median(cpu_times[num]) / statistics.median(cpu_times[den])}


def main() -> None:
    parser = argparse.ArgumentParser(description="Training step: KD from the cache vs CE only vs online KD; peak memory.")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 8 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=12288, help="store size (teacher-pass tokens)")
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--small-student-layers", type=int, nargs="*", default=[2],
                        help="smaller students also timed (no memory runs); none: only --student-layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", choices=["on", "off"], default=None, help="default: on for CUDA, off on CPU")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps each memory process runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on CPU")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2+1 steps, batch 2, 4,096-token store")
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.steps = args.steps if args.steps is not None else 30 if cuda else 8
    args.warmup = args.warmup if args.warmup is not None else 5 if cuda else 1
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.tokens, args.memory_steps = 2, 1, 2, 4096, 1
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(args)))
        return

    started = time.perf_counter()
    store = ensure_store(args)
    run = time_student(store, args, args.student_layers)
    times, cpu_times, tokens = run["times"], run["cpu_times"], run["tokens"]
    same_batches, first_ids, device = run["same_batches"], run["first_ids"], run["device"]
    student_params = run["student_params"]
    teacher_params, teacher_bytes, teacher_dtype = run["teacher_params"], run["teacher_bytes"], run["teacher_dtype"]
    student_origin = run["student_origin"]
    smaller = {layers: time_student(store, args, layers) for layers in args.small_student_layers}
    timing_s = time.perf_counter() - started

    memory = {}
    if not args.no_memory:
        for mode in MEMORY_MODES:
            memory[mode] = memory_in_subprocess(mode, store, args)

    med = {m: statistics.median(times[m]) for m in ALL_MODES}
    best = {m: min(times[m]) for m in ALL_MODES}
    cpu = {m: statistics.median(cpu_times[m]) for m in ALL_MODES}
    tok = {m: statistics.median(tokens[m]) for m in ALL_MODES}

    def ratios(num: str, den: str) -> dict[str, float]:
        return ratio_figures(times, cpu_times, num, den)

    kd_ce, kdce_ce, on_off = ratios("kd", "ce"), ratios("kd+ce", "ce"), ratios("online", "kd")
    hf_kd_ce = ratios("hf-kd", "hf-ce")
    hf_gap = abs(hf_kd_ce["median"] - kd_ce["median"])
    limit = (2 * teacher_params + 6 * student_params) / (6 * student_params)
    dev_name = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    if device.type == "cpu":
        dev_name += f" ({torch.get_num_threads()} threads)"
    bf16 = args.bf16 == "on" if args.bf16 is not None else device.type == "cuda"

    print(f"## training step: student {student_origin} ({student_params / 1e6:.1f} M parameters), "
          f"teacher {args.teacher} ({teacher_params / 1e6:.1f} M, {teacher_dtype}), "
          f"batch {args.batch_size}×{args.row_length}, {dev_name}, bf16 {'on' if bf16 else 'off'}")
    print()
    print(f"{args.warmup} warm-up + {args.steps} timed steps per mode, interleaved (one step of each mode per round); "
          f"same sample ids in every mode: {'yes' if same_batches else 'NO'} (first batch {first_ids})")
    print()
    print("| mode | losses | median ms/step | best ms/step | median CPU s/step | tokens/step | tokens/s (median) | vs CE | vs KD-from-cache |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in ALL_MODES:
        where = " (teacher resident)" if m == "online" else "" if m.endswith("ce") else " (cache)"
        spec = MODES[m]["losses"] if m in MODES else HF_MODES[m]
        losses = "+".join(x["name"] for x in spec) + where + (", HF KDTrainer" if m in HF_MODES else "")
        print(f"| {m} | {losses} | {med[m] * 1e3:,.0f} | {best[m] * 1e3:,.0f} | {cpu[m]:.2f} | {tok[m]:,.0f} | "
              f"{tok[m] / med[m]:,.0f} | {med[m] / med['ce']:.3f} | {med[m] / med['kd']:.3f} |")
    print()
    print("| ratio | of medians (target figure) | of bests | median of per-round ratios | of CPU time | target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r, target in (("KD-from-cache / CE", kd_ce, "≤ 1.05"), ("KD+CE from cache / CE", kdce_ce, "≤ 1.08"),
                            ("online KD / KD-from-cache", on_off, f"≥ 0.95 × arithmetic limit {limit:.3f}"),
                            ("HF KDTrainer: KD / CE (fused)", hf_kd_ce, f"within 0.03 of kdcache train's {kd_ce['median']:.3f}")):
        print(f"| {name} | {r['median']:.3f} | {r['best']:.3f} | {r['paired']:.3f} | {r['cpu']:.3f} | {target} |")
    print()
    print(f"arithmetic limit of online/offline = (2·T + 6·S)/(6·S) = (2·{teacher_params / 1e6:.1f}M + "
          f"6·{student_params / 1e6:.1f}M)/(6·{student_params / 1e6:.1f}M) = {limit:.3f} "
          f"(teacher forward 2·T, student forward + backward 6·S FLOPs/token); measured {on_off['median']:.3f}")
    if memory:
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

    targets: dict[str, Any] = {
        "kd_vs_ce_step_ratio<=1.05": {"value": round(kd_ce["median"], 4), "limit": 1.05,
                                      "pass": kd_ce["median"] <= 1.05},
        "kdce_vs_ce_step_ratio<=1.08": {"value": round(kdce_ce["median"], 4), "limit": 1.08,
                                        "pass": kdce_ce["median"] <= 1.08},
        "hf_kd_vs_ce_within_0.03_of_kdcache": {"value": round(hf_gap, 4), "limit": 0.03, "pass": hf_gap <= 0.03},
    }
    result: dict[str, Any] = {
        "kd_vs_ce_step_ratio": round(kd_ce["median"], 4),
        "online_vs_offline_step_ratio": round(on_off["median"], 4),
        "kdce_vs_ce_step_ratio": round(kdce_ce["median"], 4),
        "hf_kd_vs_ce_step_ratio": round(hf_kd_ce["median"], 4),
        "hf_fused": run["hf_fused"],
        "ratios": {name: {k: round(v, 4) for k, v in r.items()}
                   for name, r in (("kd_vs_ce", kd_ce), ("kdce_vs_ce", kdce_ce), ("online_vs_offline", on_off),
                                   ("hf_kd_vs_ce", hf_kd_ce))},
        "arithmetic_limit": round(limit, 4),
        "offline_peak_mem_mb": round(peak_mb(memory["kd"]), 1) if memory else None,
        "online_peak_mem_mb": round(peak_mb(memory["online"]), 1) if memory else None,
        "teacher_weights_mb": round(teacher_bytes / MB, 1),
        "device": dev_name,
        "bf16": bf16,
        "student_params": student_params,
        "teacher_params": teacher_params,
        "batch": [args.batch_size, args.row_length],
        "steps": args.steps,
        "warmup": args.warmup,
        "same_batches": same_batches,
        "ms_per_step": {m: round(med[m] * 1e3, 1) for m in ALL_MODES},
        "ms_per_step_best": {m: round(best[m] * 1e3, 1) for m in ALL_MODES},
        "cpu_s_per_step": {m: round(cpu[m], 3) for m in ALL_MODES},
        "tokens_per_step": {m: tok[m] for m in ALL_MODES},
        "tokens_per_s": {m: round(tok[m] / med[m], 1) for m in ALL_MODES},
        "memory": memory,
        "timing_wall_s": round(timing_s, 1),
    }
    if memory:
        diff = peak_mb(memory["online"]) - peak_mb(memory["kd"])
        targets["online_minus_offline_peak_mb>=teacher_weights_mb"] = {
            "value": round(diff, 1), "limit": round(teacher_bytes / MB, 1), "pass": diff >= teacher_bytes / MB}
    targets["same_batches"] = {"value": same_batches, "pass": same_batches}
    targets["all_targets_pass"] = all(t["pass"] for t in targets.values())
    students: dict[str, Any] = {}
    for layers, small in smaller.items():
        r = {name: ratio_figures(small["times"], small["cpu_times"], num, den)
             for name, num, den in (("kd_vs_ce", "kd", "ce"), ("kdce_vs_ce", "kd+ce", "ce"),
                                    ("online_vs_offline", "online", "kd"), ("hf_kd_vs_ce", "hf-kd", "hf-ce"))}
        small_limit = (2 * small["teacher_params"] + 6 * small["student_params"]) / (6 * small["student_params"])
        students[f"{layers}_layers"] = {
            "student_params": small["student_params"], "arithmetic_limit": round(small_limit, 4),
            "kd_vs_ce_step_ratio": round(r["kd_vs_ce"]["median"], 4),
            "kdce_vs_ce_step_ratio": round(r["kdce_vs_ce"]["median"], 4),
            "online_vs_offline_step_ratio": round(r["online_vs_offline"]["median"], 4),
            "online_vs_offline_of_limit": round(r["online_vs_offline"]["median"] / small_limit, 4),
            "hf_kd_vs_ce_step_ratio": round(r["hf_kd_vs_ce"]["median"], 4),
            "ratios": {name: {k: round(v, 4) for k, v in x.items()} for name, x in r.items()},
            "ms_per_step": {m: round(statistics.median(small["times"][m]) * 1e3, 1) for m in ALL_MODES},
            "same_batches": small["same_batches"],
        }
        targets[f"online_vs_offline_{layers}_layers>=0.95*limit"] = {
            "value": round(r["online_vs_offline"]["median"], 4), "limit": round(0.95 * small_limit, 4),
            "pass": r["online_vs_offline"]["median"] >= 0.95 * small_limit}
    targets[f"online_vs_offline_{args.student_layers}_layers>=0.95*limit"] = {
        "value": round(on_off["median"], 4), "limit": round(0.95 * limit, 4), "pass": on_off["median"] >= 0.95 * limit}
    targets["all_targets_pass"] = all(t["pass"] for k, t in targets.items() if k != "all_targets_pass")
    result["students"] = students
    result["targets"] = targets
    if students:
        print()
        print("Smaller students (same store and batches; ratios of median steps):")
        print()
        print("| student | parameters | KD / CE | KD+CE / CE | online / offline | arithmetic limit | of limit |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, st in students.items():
            print(f"| {name.replace('_', ' ')} | {st['student_params'] / 1e6:.1f} M | {st['kd_vs_ce_step_ratio']:.3f} | "
                  f"{st['kdce_vs_ce_step_ratio']:.3f} | {st['online_vs_offline_step_ratio']:.3f} | "
                  f"{st['arithmetic_limit']:.3f} | {st['online_vs_offline_of_limit']:.3f} |")
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
