"""Two-teacher step vs one-teacher step, same student and batches, one run.

    .venv/bin/python -m bench.multi_teacher [--steps 8] [--warmup 1] [--batch-size 4] [--quick]

Stores: the `bench/train.py` store (real default teacher, built-in corpus, top-64) as teacher 0,
and a second store over the same rows as teacher 1 (the same offline teacher — the only real
model this machine has — captured with another sparsifier, top-p 0.95 capped at 64, so it is a
different store with the same field shapes). Modes: `one` (fkl from teacher 0) and `two`
(`multi_teacher`, per_teacher fkl, weights ½ ½, teacher 1's rows joined by sample id). Rounds
alternate the order; the median step is reported. Prints a table and, last, one JSON line with
`two_vs_one_teacher_step_ratio` (target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_stores import cached_store  # noqa: E402
from bench.common import bench_trainer, log, sync  # noqa: E402

TARGET = 1.15


def store_config(args: argparse.Namespace, topk: dict) -> dict:
    return {"teacher": {"name": "default"}, "corpus": {"kind": "builtin"}, "row_length": 256, "shard_rows": 16,
            "split": "train", "max_tokens": args.tokens, "signals": {"topk": topk}}


def trainer(store: str, extra: list[str], losses: list[dict], out: str, args: argparse.Namespace) -> Any:
    return bench_trainer(store=store, extra_stores=extra, out=out, losses=losses, seed=0, device=args.device,
                         student={"init": "teacher_layers", "num_layers": 6}, batch_size=args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Two-teacher vs one-teacher training step.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.tokens = 2, 1, 2, 4096
    torch.set_num_threads(args.threads)
    first = cached_store("train-store", store_config(args, {"k": 64}))
    second = cached_store("train-store-topp", store_config(args, {"k": 64, "sampler": "topp_k", "top_p": 0.95}))
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-multi-") as tmp:
        trainers = {
            "one": trainer(first, [], [{"name": "fkl"}], f"{tmp}/one", args),
            "two": trainer(first, [second], [{"name": "multi_teacher", "mode": "per_teacher", "weights": [0.5, 0.5]}],
                           f"{tmp}/two", args),
        }
        batches = {m: t.batches() for m, t in trainers.items()}
        times: dict[str, list[float]] = {m: [] for m in trainers}
        device = trainers["one"].device
        for r in range(args.warmup + args.steps):
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for m in order:
                sync(device)
                start = time.perf_counter()
                trainers[m].train_step(batches[m])
                sync(device)
                if r >= args.warmup:
                    times[m].append(time.perf_counter() - start)
            log(f"round {r + 1}: " + " ".join(f"{m}={times[m][-1] * 1e3:.0f}ms" for m in trainers if times[m]))
    med = {m: statistics.median(v) for m, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["two"], times["one"], strict=True))
    ratio = med["two"] / med["one"]
    print(f"## two-teacher vs one-teacher step: batch {args.batch_size}×256, {device}, {args.steps} timed steps\n")
    print("| mode | losses | median ms/step |\n|---|---|---:|")
    print(f"| one | fkl (teacher 0) | {med['one'] * 1e3:,.0f} |")
    print(f"| two | multi_teacher per_teacher fkl (teachers 0 + 1, joined by sample id) | {med['two'] * 1e3:,.0f} |")
    print(f"\ntwo / one = {ratio:.3f} (median of per-round ratios {paired:.3f}); target ≤ {TARGET}")
    print(json.dumps({"two_vs_one_teacher_step_ratio": round(ratio, 4), "paired_ratio": round(paired, 4),
                      "ms_per_step": {m: round(v * 1e3, 1) for m, v in med.items()}, "batch": [args.batch_size, 256],
                      "steps": args.steps, "device": str(device),
                      "targets": {"two_vs_one<=1.15": {"value": round(ratio, 4), "limit": TARGET, "pass": ratio <= TARGET}}}))


if __name__ == "__main__":
    main()
