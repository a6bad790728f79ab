"""Quality experiment: does a student trained from the cache learn what the teacher knows?

    .venv/bin/python bench/quality.py [--tokens 16384] [--steps 64] [--batch-size 1]
                                      [--eval-tokens 4096] [--methods ce,topk64,...] [--quick]

Same student initialisation (6 of the teacher's 30 layers), same batches (same seed), same steps
for every method; one run:

  ce             cross-entropy only (the baseline)
  topk8          forward KL over the cached top-8 + exact tail
  topk64         forward KL over the cached top-64 + exact tail
  sample12       random-sampling KD from 12 cached draws per token (arXiv 2503.16870)
  online_full    forward KL against the resident teacher's full distribution (the reference)
  feature_align  fakd: hidden MSE + attention KL + forward KL over top-64 (arXiv 2412.19449)
  dskd           dual-space KD from the cached last hidden states + stored head (arXiv 2406.17328)

Stores (real offline teacher, built-in corpus, train split, built once and reused, see
`bench_stores`): `full` = top-64 + 12 draws + hidden 13, 30 + attention of layers 12, 29 (all 9
heads, top-16 keys per query); `top8` = top-8. Held-out: the validation documents of the same
corpus (`pipeline.evaluate`): perplexity, KL(teacher ‖ student), ECE, top-1 agreement.
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_stores import cached_store, log  # noqa: E402

from kdstore.summary import summarize  # noqa: E402
from pipeline.evaluate import EvalConfig, evaluate  # noqa: E402
from pipeline.trainer import TrainConfig, train  # noqa: E402

STUDENT_LAYERS = [0, 6, 12, 17, 23, 29]  # evenly_spaced(30, 6)
HIDDEN_LAYERS = [13, 30]  # after teacher layers 12 and 29 = after student layers 2 and 5
ATTN_LAYERS = [12, 29]  # = student layers 2 and 5
HEADS = list(range(9))
FEATURE_ALIGN = {
    "name": "fakd",
    "output": {"name": "fkl", "weight": 1.0},
    "hidden": {"name": "hidden", "weight": 0.05, "metric": "mse", "layer_map": [[3, 13], [6, 30]]},
    "attention": {"name": "attention", "weight": 0.1, "metric": "kl", "layer_map": [[2, 12], [5, 29]],
                  "head_map": [[h, h] for h in HEADS]},
}
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"store": "full", "losses": [{"name": "ce"}]},
    "topk8": {"store": "top8", "losses": [{"name": "fkl"}]},
    "topk64": {"store": "full", "losses": [{"name": "fkl"}]},
    "sample12": {"store": "full", "losses": [{"name": "sampled_kd"}]},
    "online_full": {"store": "full", "losses": [{"name": "fkl"}], "online_teacher": "default",
                    "online_full_logits": True},
    "feature_align": {"store": "full", "losses": [FEATURE_ALIGN]},
    "dskd": {"store": "full", "losses": [{"name": "dskd"}]},
}
TARGETS = {  # (method, reference, allowed relative perplexity excess)
    "topk64_vs_online_full_ppl": ("topk64", "online_full", 0.02),
    "sample12_vs_online_full_ppl": ("sample12", "online_full", 0.01),
}


def store_configs(tokens: int, teacher: str) -> dict[str, dict[str, Any]]:
    base = {"teacher": {"name": teacher, "batch_size": 8}, "corpus": {"kind": "builtin"}, "row_length": 256,
            "shard_rows": 16, "split": "train", "max_tokens": tokens}
    return {
        "full": {**base, "signals": {"topk": {"k": 64}, "sampled": {"n_draws": 12},
                                     "hidden": {"layers": HIDDEN_LAYERS},
                                     "attention": {"layers": ATTN_LAYERS, "heads": HEADS, "topk": 16}}},
        "top8": {**base, "signals": {"topk": {"k": 8}}},
    }


def train_method(name: str, store: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    method = {k: v for k, v in METHODS[name].items() if k != "store"}
    cfg = TrainConfig(
        store=store, out=str(out),
        student={"init": "teacher_layers", "teacher": args.teacher, "layers": STUDENT_LAYERS},
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 16),
        seed=args.seed, checkpoint_every=10 ** 9, log_every=max(1, args.steps // 4), device=args.device,
        tensorboard=False, **method)
    started = time.perf_counter()
    result = train(cfg, progress=True)
    wall = time.perf_counter() - started
    steps_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "tokens": sum(len(s["sample_ids"]) for s in steps_log) * 256,
            "last": result["last"], "sample_ids": [s["sample_ids"] for s in steps_log]}


def field_bytes(store: str, prefixes: tuple[str, ...]) -> float:
    per_field = summarize(store).field_bytes_per_token()
    return sum(v for k, v in per_field.items() if k.startswith(prefixes))


STORE_FIELDS = {  # which stored files each method reads (for its bytes/token)
    "ce": ("tokens",), "topk8": ("tokens", "topk_"), "topk64": ("tokens", "topk_"), "sample12": ("tokens", "draws"),
    "online_full": ("tokens",), "feature_align": ("tokens", "topk_", "hidden_", "attn_"),
    "dskd": ("tokens", "topk_", "hidden_30"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Held-out quality of students trained from the cache vs CE and online KD.")
    parser.add_argument("--tokens", type=int, default=16_384, help="teacher-pass tokens (train split)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="keep the students here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4,096 tokens, 4 steps, 512 eval tokens")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.steps, args.eval_tokens = 4096, 4, 512
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    started = time.perf_counter()
    configs = store_configs(args.tokens, args.teacher)
    stores = {key: cached_store(f"quality-{key}", configs[key]) for key in sorted({METHODS[m]["store"] for m in methods})}
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdcache-quality-"))
    trained: dict[str, dict[str, Any]] = {}
    for name in methods:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        log(f"--- {name}: {METHODS[name]['losses']}")
        trained[name] = train_method(name, stores[METHODS[name]["store"]], out, args)
        log(f"    {name}: {trained[name]['wall_s']} s")
    reference_ids = trained[methods[0]]["sample_ids"]
    same_batches = all(t["sample_ids"] == reference_ids for t in trained.values())
    eval_cfg = EvalConfig(store=stores["full"] if "full" in stores else next(iter(stores.values())), out=str(root / "eval"),
                          models={m: str(root / m / "model") for m in methods}, baseline="ce" if "ce" in methods else None,
                          teacher=args.teacher, max_tokens=args.eval_tokens, generation=None, device=args.device)
    result = evaluate(eval_cfg, progress=log)
    models = result["models"]
    rows = []
    for name in ["teacher", *methods]:
        m = models[name]
        bpt = field_bytes(stores[METHODS[name]["store"]], STORE_FIELDS[name]) if name in METHODS else None
        rows.append((name, m["ppl"], m.get("kl_to_teacher"), 100 * m["ece"], m.get("top1_agreement"), bpt,
                     trained[name]["wall_s"] if name in trained else None))
    print(f"\nquality: {args.tokens:,} cached tokens, {args.steps} steps × {args.batch_size}×256 tokens, "
          f"{result['heldout_tokens']:,} held-out tokens, same batches: {same_batches}")
    print(f"{'method':14s} {'ppl':>9s} {'KL→teacher':>11s} {'ECE pts':>8s} {'top-1 agr':>9s} {'B/token':>9s} {'train s':>8s}")
    for name, ppl, kl, ece, agree, bpt, wall in rows:
        print(f"{name:14s} {ppl:9.3f} {_f(kl, '.4f'):>11s} {ece:8.2f} {_f(agree, '.3f'):>9s} {_f(bpt, '.1f'):>9s} {_f(wall, '.0f'):>8s}")
    targets: dict[str, Any] = {}
    if "ce" in models:
        for name in methods:
            if name != "ce":
                targets[f"{name}_beats_ce"] = {"value": models[name]["ppl"], "limit": models["ce"]["ppl"],
                                               "pass": models[name]["ppl"] < models["ce"]["ppl"]}
    for key, (a, b, excess) in TARGETS.items():
        if a in models and b in models:
            ratio = models[a]["ppl"] / models[b]["ppl"]
            targets[key] = {"value": round(ratio, 4), "limit": 1 + excess, "pass": ratio <= 1 + excess}
    if "sample12" in models and "online_full" in models:
        gap = 100 * abs(models["sample12"]["ece"] - models["online_full"]["ece"])
        targets["sample12_vs_online_full_ece_pts"] = {"value": round(gap, 3), "limit": 0.5, "pass": gap <= 0.5}
    for key, t in targets.items():
        print(f"target {key}: {t['value']} (limit {t['limit']}) {'pass' if t['pass'] else 'MISS'}")
    summary = {
        "ppl": {m: round(models[m]["ppl"], 4) for m in ["teacher", *methods]},
        "ece": {m: round(models[m]["ece"], 5) for m in ["teacher", *methods]},
        "kl_to_teacher": {m: round(models[m]["kl_to_teacher"], 5) for m in ["teacher", *methods]},
        "top1_agreement": {m: round(models[m]["top1_agreement"], 4) for m in ["teacher", *methods]},
        "bytes_per_token": {r[0]: round(r[5], 1) for r in rows if r[5] is not None},
        "train_wall_s": {m: trained[m]["wall_s"] for m in methods},
        "targets": targets, "all_targets_pass": all(t["pass"] for t in targets.values()),
        "same_batches": same_batches, "tokens": args.tokens, "steps": args.steps, "batch": args.batch_size,
        "lr": args.lr, "heldout_tokens": result["heldout_tokens"], "seed": args.seed,
        "device": ("cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)") if args.device == "auto" else args.device,
        "wall_s": round(time.perf_counter() - started, 1), "students": str(root),
    }
    print(json.dumps(summary))


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
