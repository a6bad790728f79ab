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

Beyond one teacher and one vocabulary (each compared with its CE-only counterpart):

  ce_foreign_tokenizer      CE only, the student with its own tokenizer (a byte-level BPE of
                            8,192 ids trained here on the store's training documents); the
                            student's new embedding rows start from the teacher's (same text)
  cross_tokenizer_baseline  that student, xtok_align (position pairing + first-token id map) + CE
  cross_tokenizer_cma       that student, DSKD with cross-model attention (dskd_cma) + CE
  multi_teacher             per-teacher forward KL: the teacher (0.8) and the topk64 student of
                            this run cached as a second teacher (0.2), joined by sample id
  self_distill_round2       born-again: forward KL from a store whose teacher is the topk64
                            student of this run (round 1)
  adversarial               forward KL + 0.1 × adversarial loss on the last hidden states

Stores (real offline teacher, built-in corpus, train split, built once and reused, see
`bench_stores`): `full` = top-64 + 12 draws + hidden 13, 30 + attention of layers 12, 29 (all 9
heads, top-16 keys per query); `top8` = top-8. Held-out: the validation documents of the same
corpus (`pipeline.evaluation.evaluate`): perplexity, KL(teacher ‖ student), ECE, top-1 agreement.
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
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
from pipeline.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from pipeline.train.trainer import TrainConfig, train  # noqa: E402

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
    "ce_foreign_tokenizer": {"store": "xtok", "losses": [{"name": "ce"}], "own_tokenizer": True},
    "cross_tokenizer_baseline": {"store": "xtok", "losses": [{"name": "xtok_align"}, {"name": "ce"}],
                                 "own_tokenizer": True},
    "cross_tokenizer_cma": {"store": "xtok", "losses": [{"name": "dskd_cma"}, {"name": "ce"}], "own_tokenizer": True},
    "multi_teacher": {"store": "full", "second_teacher": "topk64",
                      "losses": [{"name": "multi_teacher", "weights": [0.8, 0.2]}]},
    "self_distill_round2": {"store": "full", "teacher_from": "topk64", "losses": [{"name": "fkl"}]},
    "adversarial": {"store": "full", "losses": [{"name": "fkl"}, {"name": "adversarial", "weight": 0.1}]},
}
COUNTERPART = {"cross_tokenizer_baseline": "ce_foreign_tokenizer", "cross_tokenizer_cma": "ce_foreign_tokenizer"}
STUDENT_VOCAB = 8192
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
        "xtok": {**base, "signals": {"topk": {"k": 64}, "hidden": {"layers": [30]}, "text": True}},
    }


def train_method(name: str, store: str, out: Path, args: argparse.Namespace, tokenizer: Path | None,
                 extra_stores: list[str]) -> dict[str, Any]:
    method = {k: v for k, v in METHODS[name].items() if k in ("losses", "online_teacher", "online_full_logits")}
    student: dict[str, Any] = {"init": "teacher_layers", "teacher": args.teacher, "layers": STUDENT_LAYERS}
    if METHODS[name].get("own_tokenizer"):
        student["tokenizer"] = str(tokenizer)
    cfg = TrainConfig(
        store=store, out=str(out), student=student, extra_stores=extra_stores,
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 16),
        seed=args.seed, checkpoint_every=10 ** 9, log_every=max(1, args.steps // 4), device=args.device,
        tensorboard=False, **method)
    started = time.perf_counter()
    result = train(cfg, progress=True)
    wall = time.perf_counter() - started
    steps_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1), "tokens": sum(len(s["sample_ids"]) for s in steps_log) * 256,
            "last": result["last"], "sample_ids": [s["sample_ids"] for s in steps_log]}


def student_store(config: dict[str, Any], student_run: Path) -> str:
    """The `full` store's rows cached with a trained student of this run as the teacher (top-64)."""
    data = {**config, "teacher": {"name": str(student_run), "batch_size": 8}, "signals": {"topk": {"k": 64}}}
    weights = hashlib.sha256((student_run / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    return cached_store(f"quality-student-{student_run.name}-{weights}", data)


def with_dependencies(methods: list[str]) -> list[str]:
    """Methods in order, each student another one is cached from trained first."""
    out: list[str] = []
    for name in methods:
        for dep in (METHODS[name].get("second_teacher"), METHODS[name].get("teacher_from")):
            if dep and dep not in out:
                out.append(dep)
        if name not in out:
            out.append(name)
    return out


def field_bytes(store: str, prefixes: tuple[str, ...]) -> float:
    per_field = summarize(store).field_bytes_per_token()
    return sum(v for k, v in per_field.items() if k.startswith(prefixes))


STORE_FIELDS = {  # which stored files each method reads (for its bytes/token)
    "ce": ("tokens",), "topk8": ("tokens", "topk_"), "topk64": ("tokens", "topk_"), "sample12": ("tokens", "draws"),
    "online_full": ("tokens",), "feature_align": ("tokens", "topk_", "hidden_", "attn_"),
    "dskd": ("tokens", "topk_", "hidden_30"), "ce_foreign_tokenizer": ("tokens", "text"),
    "cross_tokenizer_baseline": ("tokens", "topk_", "text"), "cross_tokenizer_cma": ("tokens", "topk_", "text", "hidden_30"),
    "multi_teacher": ("tokens", "topk_"), "self_distill_round2": ("tokens", "topk_"), "adversarial": ("tokens", "topk_", "hidden_30"),
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
    methods = with_dependencies(methods)
    started = time.perf_counter()
    configs = store_configs(args.tokens, args.teacher)
    stores = {key: cached_store(f"quality-{key}", configs[key]) for key in sorted({METHODS[m]["store"] for m in methods})}
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdcache-quality-"))
    tokenizer = None
    if any(METHODS[m].get("own_tokenizer") for m in methods):
        from pipeline.train.student_tokenizer import train_store_tokenizer

        tokenizer = root / "student_tokenizer"
        own = train_store_tokenizer(stores["xtok"], STUDENT_VOCAB, tokenizer)
        log(f"student tokenizer: byte-level BPE, {len(own):,} ids, trained on the store's training documents")
    trained: dict[str, dict[str, Any]] = {}
    for name in methods:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        spec = METHODS[name]
        store, extra = stores[spec["store"]], []
        if spec.get("teacher_from"):
            store = stores[name] = student_store(configs["full"], root / spec["teacher_from"])
        if spec.get("second_teacher"):
            extra = [student_store(configs["full"], root / spec["second_teacher"])]
        log(f"--- {name}: {spec['losses']}")
        trained[name] = train_method(name, store, out, args, tokenizer, extra)
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
        bpt = field_bytes(stores.get(name, stores[METHODS[name]["store"]]), STORE_FIELDS[name]) if name in METHODS else None
        rows.append((name, m["ppl"], m.get("kl_to_teacher"), 100 * m["ece"], m.get("top1_agreement"), bpt,
                     trained[name]["wall_s"] if name in trained else None, m["bits_per_byte"]))
    print(f"\nquality: {args.tokens:,} cached tokens, {args.steps} steps × {args.batch_size}×256 tokens, "
          f"{result['heldout_tokens']:,} held-out tokens, same batches: {same_batches}")
    print("(own-tokenizer students: ppl per their own tokens, compare them with ce_foreign_tokenizer; bits/byte compares all)")
    print(f"{'method':24s} {'ppl':>9s} {'bits/B':>7s} {'KL→teacher':>11s} {'ECE pts':>8s} {'top-1 agr':>9s} {'B/token':>9s} {'train s':>8s}")
    for name, ppl, kl, ece, agree, bpt, wall, bpb in rows:
        print(f"{name:24s} {ppl:9.3f} {bpb:7.3f} {_f(kl, '.4f'):>11s} {ece:8.2f} {_f(agree, '.3f'):>9s} {_f(bpt, '.1f'):>9s} "
              f"{_f(wall, '.0f'):>8s}")
    targets: dict[str, Any] = {}
    for name in methods:
        base = COUNTERPART.get(name, "ce")
        if name not in ("ce", "ce_foreign_tokenizer") and base in models:
            targets[f"{name}_beats_{base}"] = {"value": models[name]["ppl"], "limit": models[base]["ppl"],
                                               "pass": models[name]["ppl"] < models[base]["ppl"]}
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
        "bits_per_byte": {m: round(models[m]["bits_per_byte"], 4) for m in ["teacher", *methods]},
        "kl_to_teacher": {m: round(models[m]["kl_to_teacher"], 5) for m in ["teacher", *methods] if "kl_to_teacher" in models[m]},
        "top1_agreement": {m: round(models[m]["top1_agreement"], 4) for m in ["teacher", *methods] if "top1_agreement" in models[m]},
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
