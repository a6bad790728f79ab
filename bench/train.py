"""Student training step: KD from the cache vs CE only vs online KD (teacher resident), same
student and batches, one run; `KDTrainer`'s KD / CE beside `kdcache train`'s; the peak memory of
offline and online KD.

    .venv/bin/python -m bench.train [--steps N] [--round-steps K] [--warmup W] [--batch-size 4]
                                    [--tokens 12288] [--device auto] [--no-memory] [--quick]

Store: the real default teacher (SmolLM2-135M-Instruct) over the built-in corpus, top-64,
rows of 256, built once and reused from `$KDCACHE_BENCH_CACHE/train-store-<key>` (default
`<tmp>/kdcache-bench/`) while `verify_store` finds it clean. Student: 6 of the teacher's 30
layers, then (timing only) a smaller one, 2 layers by default (--small-student-layers), whose
online/offline arithmetic limit is above 2 (the teacher's forward weighs more against a cheaper
student step). The output losses run fused (last hidden state + head, no whole logits) in
every mode, as the trainer runs them. Modes, each a fresh `Trainer` with the same seed:
`ce` (CE only), `kd` (fkl from the cache), `kd+ce`, `online` (fkl from the resident teacher);
and the same student through the Hugging Face `KDTrainer` (fused, `bench.train_steppers`): `hf-kd`
and `hf-ce`. Target: KDTrainer's KD / CE within 0.03 of `kdcache train`'s.

What is timed is the step on a batch already drawn: each mode draws its batches from its own
loader first (KDStream; StoreRows + KDCollator for KDTrainer: the draw is timed apart, "load
ms/batch"), the batches are checked equal field by field across modes, and the same batches are
cycled through in every mode. Warm-up steps, then rounds: in each round every mode takes
`--round-steps` steps, in a seeded random order (a rotation would keep each mode behind the same
neighbour, one of them behind the online mode's teacher pass every round), with Python's GC off
(collected between rounds) and the loss components read from the device between rounds (as a
logging step does), outside the timing. A ratio is the median of its per-round ratios, reported with its
quartiles and a 95 % interval (`bench.paired`); the KDTrainer target is the median of the
per-round differences of the two KD / CE ratios (all four modes ran in each round).
Peak memory: each of `kd` and `online` in its own process (`bench.train_memory`).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from bench.bench_stores import cached_store
from bench.common import log, sync
from bench.paired import gap_figures, ratio_figures
from bench.train_memory import MB, MEMORY_MODES, memory_in_subprocess, peak_mb, print_memory
from bench.train_steppers import (
    ALL_MODES,
    HF_MODES,
    MODES,
    HFStepper,
    KdcacheStepper,
    same_batches,
    unique_params,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def timed(stepper: Any, batches: list[dict[str, Any]], device: torch.device) -> tuple[float, float]:
    """(wall s, process CPU s) of `stepper`'s steps on `batches`, the device's queue drained before and after."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        stepper.step(batch)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


# ---------------------------------------------------------------- timing


PAIRS = {"kd_vs_ce": ("kd", "ce"), "kdce_vs_ce": ("kd+ce", "ce"), "online_vs_offline": ("online", "kd"),
         "hf_kd_vs_ce": ("hf-kd", "hf-ce")}


def time_student(store: str, args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """Every mode with a student of `layers` teacher layers: batches drawn, warm-up, interleaved rounds."""
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
        steppers: dict[str, Any] = {}
        for mode in ALL_MODES:
            t0 = time.perf_counter()
            steppers[mode] = (KdcacheStepper if mode in MODES else HFStepper)(mode, store, f"{tmp}/{mode}", args, layers)
            log(f"built {mode} ({layers} layers, fused losses {steppers[mode].fused}) in {time.perf_counter() - t0:.1f} s")
        kd = steppers["kd"].trainer
        rounds = -(-args.steps // args.round_steps)
        pool = min(args.warmup + rounds * args.round_steps, kd.reader.num_rows() // args.batch_size)
        pools, load_s = {}, {}
        for mode, stepper in steppers.items():
            t0 = time.perf_counter()
            pools[mode] = stepper.batches(pool)
            load_s[mode] = (time.perf_counter() - t0) / pool
        times: dict[str, list[float]] = {m: [] for m in ALL_MODES}
        cpu_times: dict[str, list[float]] = {m: [] for m in ALL_MODES}
        for i in range(args.warmup):
            for mode in ALL_MODES:
                steppers[mode].step(pools[mode][i % pool])
        shuffle = random.Random(args.seed)  # a fresh order each round: no mode always follows the same one
        for r in range(rounds):
            for stepper in steppers.values():
                stepper.read_log()  # the components of the steps before (one sync each), untimed
            gc.collect()
            gc.disable()
            try:
                order = shuffle.sample(ALL_MODES, len(ALL_MODES))
                first = args.warmup + r * args.round_steps
                for mode in order:
                    batches = [pools[mode][(first + j) % pool] for j in range(args.round_steps)]
                    wall, cpu = timed(steppers[mode], batches, kd.device)
                    times[mode].append(wall / args.round_steps)
                    cpu_times[mode].append(cpu / args.round_steps)
            finally:
                gc.enable()
            log(f"{layers} layers, round {r + 1}/{rounds}: " + " ".join(f"{m}={times[m][-1] * 1e3:.0f}ms" for m in ALL_MODES))
        teacher = steppers["online"].trainer.teacher.model
        student_params, student_bytes = unique_params(kd.student.model)
        teacher_params, teacher_bytes = unique_params(teacher)
        return {
            "times": times, "cpu_times": cpu_times, "device": kd.device, "rounds": rounds, "pool": pool,
            "tokens": statistics.median(int(b["valid"].sum()) for b in pools["kd"]),
            "load_ms": {m: round(v * 1e3, 1) for m, v in load_s.items()},
            "same_batches": same_batches(pools), "first_ids": pools["kd"][0]["sample_id"].tolist(),
            "student_params": student_params, "student_bytes": student_bytes,
            "teacher_params": teacher_params, "teacher_bytes": teacher_bytes,
            "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
            "student_origin": kd.student.origin, "hf_fused": all(steppers[m].fused for m in HF_MODES),
            "threads": torch.get_num_threads(),
        }


def figures(run: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Every ratio of PAIRS (paired rounds), and KDTrainer's KD / CE minus kdcache's, round by round."""
    ratios = {name: ratio_figures(run["times"], run["cpu_times"], a, b) for name, (a, b) in PAIRS.items()}
    return ratios, gap_figures(run["times"], ("hf-kd", "hf-ce"), ("kd", "ce"))


def rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def arithmetic_limit(run: dict[str, Any]) -> float:
    """online / offline at best: (teacher forward 2·T + student forward and backward 6·S) / 6·S."""
    return (2 * run["teacher_params"] + 6 * run["student_params"]) / (6 * run["student_params"])


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training step: KD from the cache vs CE only vs online KD; peak memory.")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 20 on CPU, 60 on CUDA)")
    parser.add_argument("--round-steps", type=int, default=None,
                        help="steps each mode takes per round (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default 2 on CPU, 5 on CUDA)")
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
    parser.add_argument("--quick", action="store_true", help="smoke run: 1+2 steps, batch 2, 4,096-token store")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.steps = args.steps if args.steps is not None else 60 if cuda else 20
    args.round_steps = args.round_steps if args.round_steps is not None else 5 if cuda else 1
    args.warmup = args.warmup if args.warmup is not None else 5 if cuda else 2
    if args.quick:
        args.steps, args.round_steps, args.warmup, args.batch_size, args.tokens, args.memory_steps = 2, 1, 1, 2, 4096, 1
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    store = ensure_store(args)
    run = time_student(store, args, args.student_layers)
    smaller = {layers: time_student(store, args, layers) for layers in args.small_student_layers}
    timing_s = time.perf_counter() - started
    memory = {} if args.no_memory else {mode: memory_in_subprocess(mode, store, args) for mode in MEMORY_MODES}

    times, cpu_times, device = run["times"], run["cpu_times"], run["device"]
    med = {m: statistics.median(times[m]) for m in ALL_MODES}
    best = {m: min(times[m]) for m in ALL_MODES}
    cpu = {m: statistics.median(cpu_times[m]) for m in ALL_MODES}
    vs = {m: {d: ratio_figures(times, cpu_times, m, d)["paired"] for d in ("ce", "kd")} for m in ALL_MODES}
    ratios, gap = figures(run)
    kd_ce, kdce_ce, on_off, hf_kd_ce = (ratios[k]["paired"] for k in PAIRS)
    limit = arithmetic_limit(run)
    teacher_params, teacher_bytes, student_params = run["teacher_params"], run["teacher_bytes"], run["student_params"]
    dev_name = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    if device.type == "cpu":
        dev_name += f" ({run['threads']} threads)"
    bf16 = args.bf16 == "on" if args.bf16 is not None else device.type == "cuda"

    print(f"## training step: student {run['student_origin']} ({student_params / 1e6:.1f} M parameters), "
          f"teacher {args.teacher} ({teacher_params / 1e6:.1f} M, {run['teacher_dtype']}), "
          f"batch {args.batch_size}×{args.row_length}, {dev_name}, bf16 {'on' if bf16 else 'off'}")
    print()
    print(f"{args.warmup} warm-up + {run['rounds']} rounds × {args.round_steps} timed step(s) per mode, interleaved "
          "in a random order per round, "
          f"over {run['pool']} batches drawn first; same batches in every mode: {'yes' if run['same_batches'] else 'NO'} "
          f"(first batch {run['first_ids']})")
    print()
    print("| mode | losses | median ms/step | best ms/step | median CPU s/step | load ms/batch | tokens/s (median) "
          "| vs CE | vs KD-from-cache |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in ALL_MODES:
        where = " (teacher resident)" if m == "online" else "" if m.endswith("ce") else " (cache)"
        spec = MODES[m]["losses"] if m in MODES else HF_MODES[m]
        losses = "+".join(x["name"] for x in spec) + where + (", HF KDTrainer" if m in HF_MODES else "")
        print(f"| {m} | {losses} | {med[m] * 1e3:,.0f} | {best[m] * 1e3:,.0f} | {cpu[m]:.2f} | {run['load_ms'][m]:,.0f} | "
              f"{run['tokens'] / med[m]:,.0f} | {vs[m]['ce']:.3f} | {vs[m]['kd']:.3f} |")
    print()
    print("| ratio | median of per-round ratios (target figure) | 95 % interval | quartiles | of medians | of bests "
          "| of CPU time | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rows = (("KD-from-cache / CE", ratios["kd_vs_ce"], "≤ 1.05"), ("KD+CE from cache / CE", ratios["kdce_vs_ce"], "≤ 1.08"),
            ("online KD / KD-from-cache", ratios["online_vs_offline"], f"≥ 0.95 × arithmetic limit {limit:.3f}"),
            ("HF KDTrainer: KD / CE (fused)", ratios["hf_kd_vs_ce"], f"within 0.03 of kdcache train's {kd_ce:.3f}"),
            ("KDTrainer's KD / CE − kdcache's", {**gap, "of_medians": hf_kd_ce - kd_ce, "best": float("nan"),
                                                 "cpu": ratios["hf_kd_vs_ce"]["cpu"] - ratios["kd_vs_ce"]["cpu"]},
             "95 % interval inside ±0.03"))
    for name, r, target in rows:
        of_bests = "—" if r["best"] != r["best"] else f"{r['best']:.3f}"  # nan: no "best" of a difference
        print(f"| {name} | {r['paired']:.3f} | {r['ci95_lo']:.3f} – {r['ci95_hi']:.3f} | {r['q1']:.3f} – {r['q3']:.3f} | "
              f"{r['of_medians']:.3f} | {of_bests} | {r['cpu']:.3f} | {target} |")
    print()
    print(f"arithmetic limit of online/offline = (2·T + 6·S)/(6·S) = (2·{teacher_params / 1e6:.1f}M + "
          f"6·{student_params / 1e6:.1f}M)/(6·{student_params / 1e6:.1f}M) = {limit:.3f} "
          f"(teacher forward 2·T, student forward + backward 6·S FLOPs/token); measured {on_off:.3f}")
    if memory:
        print_memory(memory, args, teacher_params, teacher_bytes)

    gap_ok = max(abs(gap["ci95_lo"]), abs(gap["ci95_hi"])) <= 0.03
    targets: dict[str, Any] = {
        "kd_vs_ce_step_ratio<=1.05": {"value": round(kd_ce, 4), "limit": 1.05, "pass": kd_ce <= 1.05},
        "kdce_vs_ce_step_ratio<=1.08": {"value": round(kdce_ce, 4), "limit": 1.08, "pass": kdce_ce <= 1.08},
        "hf_kd_vs_ce_within_0.03_of_kdcache": {"value": round(abs(gap["paired"]), 4), "limit": 0.03, "pass": gap_ok,
                                               "ci95": [round(gap["ci95_lo"], 4), round(gap["ci95_hi"], 4)]},
    }
    if memory:
        diff = peak_mb(memory["online"]) - peak_mb(memory["kd"])
        targets["online_minus_offline_peak_mb>=teacher_weights_mb"] = {
            "value": round(diff, 1), "limit": round(teacher_bytes / MB, 1), "pass": diff >= teacher_bytes / MB}
    targets["same_batches"] = {"value": run["same_batches"], "pass": run["same_batches"]}
    students: dict[str, Any] = {}
    for layers, small in smaller.items():
        r, small_gap = figures(small)
        small_limit = arithmetic_limit(small)
        students[f"{layers}_layers"] = {
            "student_params": small["student_params"], "arithmetic_limit": round(small_limit, 4),
            **{f"{k}_step_ratio": round(v["paired"], 4) for k, v in r.items()},
            "online_vs_offline_of_limit": round(r["online_vs_offline"]["paired"] / small_limit, 4),
            "ratios": {k: rounded(v) for k, v in r.items()}, "hf_gap": rounded(small_gap),
            "ms_per_step": {m: round(statistics.median(small["times"][m]) * 1e3, 1) for m in ALL_MODES},
            "same_batches": small["same_batches"],
        }
        on = r["online_vs_offline"]["paired"]
        targets[f"online_vs_offline_{layers}_layers>=0.95*limit"] = {
            "value": round(on, 4), "limit": round(0.95 * small_limit, 4), "pass": on >= 0.95 * small_limit}
    targets[f"online_vs_offline_{args.student_layers}_layers>=0.95*limit"] = {
        "value": round(on_off, 4), "limit": round(0.95 * limit, 4), "pass": on_off >= 0.95 * limit}
    targets["all_targets_pass"] = all(t["pass"] for t in targets.values())
    if students:
        print()
        print("Smaller students (same store and batches; medians of per-round ratios):")
        print()
        print("| student | parameters | KD / CE | KD+CE / CE | online / offline | arithmetic limit | of limit "
              "| KDTrainer KD / CE − kdcache's |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, st in students.items():
            print(f"| {name.replace('_', ' ')} | {st['student_params'] / 1e6:.1f} M | {st['kd_vs_ce_step_ratio']:.3f} | "
                  f"{st['kdce_vs_ce_step_ratio']:.3f} | {st['online_vs_offline_step_ratio']:.3f} | "
                  f"{st['arithmetic_limit']:.3f} | {st['online_vs_offline_of_limit']:.3f} | {st['hf_gap']['paired']:+.3f} |")
    print()
    print(json.dumps({
        "kd_vs_ce_step_ratio": round(kd_ce, 4),
        "online_vs_offline_step_ratio": round(on_off, 4),
        "kdce_vs_ce_step_ratio": round(kdce_ce, 4),
        "hf_kd_vs_ce_step_ratio": round(hf_kd_ce, 4),
        "hf_gap": rounded(gap),
        "hf_fused": run["hf_fused"],
        "ratios": {name: rounded(r) for name, r in ratios.items()},
        "arithmetic_limit": round(limit, 4),
        "offline_peak_mem_mb": round(peak_mb(memory["kd"]), 1) if memory else None,
        "online_peak_mem_mb": round(peak_mb(memory["online"]), 1) if memory else None,
        "teacher_weights_mb": round(teacher_bytes / MB, 1),
        "device": dev_name, "threads": run["threads"], "bf16": bf16,
        "student_params": student_params, "teacher_params": teacher_params,
        "batch": [args.batch_size, args.row_length],
        "steps": run["rounds"] * args.round_steps, "round_steps": args.round_steps, "rounds": run["rounds"],
        "warmup": args.warmup, "batches_cycled": run["pool"], "same_batches": run["same_batches"],
        "ms_per_step": {m: round(med[m] * 1e3, 1) for m in ALL_MODES},
        "ms_per_step_best": {m: round(best[m] * 1e3, 1) for m in ALL_MODES},
        "cpu_s_per_step": {m: round(cpu[m], 3) for m in ALL_MODES},
        "load_ms_per_batch": run["load_ms"],
        "tokens_per_step": {m: run["tokens"] for m in ALL_MODES},
        "tokens_per_s": {m: round(run["tokens"] / med[m], 1) for m in ALL_MODES},
        "memory": memory,
        "timing_wall_s": round(timing_s, 1),
        "students": students,
        "targets": targets,
    }))


if __name__ == "__main__":
    main()
