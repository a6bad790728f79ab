"""Teacher-pass overhead: the full pass (forward + extraction + compression + commit) vs the
bare forward pass, same teacher, same batches, one run.

    .venv/bin/python bench/teacher_pass.py [--teacher default] [--rows 32] [--device auto]

Cases: top-k 64 (the target: overhead ≤ 1.05), top-k 64 + hidden states of one layer (≤ 1.10).
Bare and full passes alternate (bare, full, bare, full, ...) and the best of each is kept, so a
noisy neighbour on this machine hits both alike. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.capture.pass_setup import open_writer, teacher_for  # noqa: E402
from pipeline.capture.shard_plan import plan_shards  # noqa: E402
from pipeline.capture.teacher_pass import cache_pipelined  # noqa: E402
from pipeline.config import CacheConfig, parse_config  # noqa: E402


def config_for(store: str, args: argparse.Namespace, signals: dict) -> CacheConfig:
    return parse_config(
        {
            "store": store,
            "teacher": {"name": args.teacher, "batch_size": args.batch_size, "device": args.device},
            "corpus": {"kind": "builtin"},
            "row_length": args.row_length,
            "shard_rows": args.shard_rows,
            "split": "train",
            "max_tokens": args.rows * args.row_length,
            "signals": signals,
        },
        CacheConfig,
    )


def bare_forward(teacher, plans, batch_size: int) -> float:
    sync(teacher.device)
    start = time.perf_counter()
    for plan in plans:
        ids = torch.from_numpy(plan.rows.input_ids.astype("int64"))
        for i in range(0, len(ids), batch_size):
            with torch.inference_mode():
                teacher.model(input_ids=ids[i : i + batch_size].to(teacher.device), use_cache=False)
    sync(teacher.device)
    return time.perf_counter() - start


def full_pass(config: CacheConfig, teacher, plans) -> float:
    writer = open_writer(config, teacher)
    sync(teacher.device)
    start = time.perf_counter()
    cache_pipelined(teacher, writer, plans, config)
    sync(teacher.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--hidden-layer", type=int, default=15)
    args = parser.parse_args()
    if args.device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    cases = {
        "topk64": {"topk": {"k": 64}},
        "topk64+hidden1": {"topk": {"k": 64}, "hidden": {"layers": [args.hidden_layer], "dtype": "bfloat16"}},
    }
    rows, out = [], {}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        base = config_for(f"{tmp}/warm", args, cases["topk64"])
        teacher = teacher_for(base)
        plans = plan_shards(base, teacher.tokenizer)
        tokens = sum(p.rows.num_rows for p in plans) * args.row_length
        bare_forward(teacher, plans[:1], args.batch_size)  # warm-up
        for name, signals in cases.items():
            bare_times, full_times = [], []
            for rep in range(args.reps):
                bare_times.append(bare_forward(teacher, plans, args.batch_size))
                config = config_for(f"{tmp}/{name}-{rep}", args, signals)
                full_times.append(full_pass(config, teacher, plans))
            bare, full = min(bare_times), min(full_times)
            ratio = full / bare
            out[name] = {"bare_s": round(bare, 3), "full_s": round(full, 3), "overhead_ratio": round(ratio, 4)}
            rows.append(f"| {name} | {tokens} | {bare:.2f} | {full:.2f} | {ratio:.3f} | {tokens / full:,.0f} |")
    device = str(teacher.device) if teacher.device.type != "cuda" else torch.cuda.get_device_name(teacher.device)
    device += f" ({torch.get_num_threads()} threads)" if teacher.device.type == "cpu" else ""
    print(f"## teacher pass overhead: {args.teacher} teacher, {tokens} tokens, batch {args.batch_size}×{args.row_length}, {device}")
    print()
    print("| case | tokens | bare forward s | full pass s | overhead ratio | tokens/s (full) |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    result = {
        "overhead_ratio": out["topk64"]["overhead_ratio"],
        "overhead_ratio_hidden1": out["topk64+hidden1"]["overhead_ratio"],
        "tokens_per_s": round(tokens / out["topk64"]["full_s"], 1),
        "device": device,
        "tokens": tokens,
        "cases": out,
        "targets": {
            "overhead_ratio<=1.05": out["topk64"]["overhead_ratio"] <= 1.05,
            "overhead_ratio_hidden1<=1.10": out["topk64+hidden1"]["overhead_ratio"] <= 1.10,
        },
    }
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
