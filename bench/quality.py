"""Quality in a regime that means something: students trained several epochs over the whole cache.

    .venv/bin/python -m bench.quality [--quick] [--methods ce,topk64,...] [--epochs 3]
                                      [--device cuda] [--out runs/quality] [--fakd-sweep 0.1:0.1,1:0.1]

Every method trains the same student (a cut of the offline teacher: its embeddings, head and the
preset's layers) from the same initialisation, on the same batches (same seed, same store rows in
the same order), for the same steps: `epochs` passes over the whole cached training split of the
built-in corpus (~107k tokens; the stores are built once and reused across runs, see
`bench_stores`). The held-out perplexity is measured at step 0 and at `eval_points` evenly spaced
steps, drawn as learning curves (held-out perplexity vs student tokens) in one PNG, and the final
models get the full evaluation (ECE, KL to the teacher, top-1 agreement, bits/byte).

Methods (`bench/quality_methods.py`): ce, topk64 (label_tail 0.5), sample12, hybrid (topk_tail_sample: top-16 + 8
tail draws), online_full (the reference: forward KL against the resident teacher's full
distribution), feature_align (fakd, hidden states in the standardised space), dskd (the authors'
recipe), ce_foreign_tokenizer / cross_tokenizer_baseline / cross_tokenizer_cma (a student with
its own 8,192-id tokenizer), multi_teacher, self_distill_round2 (born-again from the topk64
student), adversarial. `--variant NAME:BASE:JSON` (repeatable) adds a run of BASE with JSON merged
into its first loss's config (a JSON list: BASE's losses replaced): a sweep. `--fakd-sweep h:a,...` adds feature_align variants with those hidden /
attention weights.

Presets: `cpu` (default; the 6 layers greedy pruning keeps, 2 epochs, bf16 autocast on this AMX
CPU), `--quick` (8,192 cached tokens, 2 epochs, ce, topk64, hybrid: ≤ 10 min here), `--device
cuda` (12 pruned layers, 8 epochs, 16k held-out tokens). Converged means the CE student's held-out perplexity improved by < 2 % over the last
quarter of its run (`ce_last_quarter_improvement`), or rose (overfitting, reported).

Prints a table and, as its last line, one JSON object: ppl, ece, bytes_per_token, curve,
ce_last_quarter_improvement, methods, targets ...
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_stores import cached_store, log  # noqa: E402
from bench.quality_methods import (  # noqa: E402
    COUNTERPART,
    PRESETS,
    STORE_FIELDS,
    STUDENT_VOCAB,
    TARGETS,
    Preset,
    feature_align,
    methods,
    store_configs,
    with_dependencies,
)
from kdstore.reader import StoreReader  # noqa: E402
from kdstore.spec import DRAW_SCHEMES  # noqa: E402
from kdstore.summary import summarize  # noqa: E402
from pipeline.evaluation.evaluate import (  # noqa: E402
    EvalConfig,
    evaluate,
    heldout_rows,
    token_bytes,
    token_metrics,
)
from pipeline.train.losses import LossConfigError, parse_loss_config  # noqa: E402
from pipeline.train.trainer import TrainConfig, Trainer  # noqa: E402

ROW = 256


def eval_steps(steps: int, points: int) -> list[int]:
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


class HeldOutScorer:
    """Held-out perplexity of an in-memory model, rows packed once per tokenizer."""

    def __init__(self, store: str, max_tokens: int, device: torch.device):
        self.reader = StoreReader(store)
        self.max_tokens = max_tokens
        self.device = device
        self.rows: dict[str, Any] = {}

    def __call__(self, model: Any, tokenizer: Any) -> float:
        key = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        if key not in self.rows:
            self.rows[key] = (heldout_rows(self.reader, tokenizer, self.max_tokens), token_bytes(tokenizer))
        rows, label_bytes = self.rows[key]
        was_training = model.training
        model.eval()
        metrics = token_metrics({"m": model}, rows, 4, 15, self.device, label_bytes)["m"]
        model.train(was_training)
        return float(metrics["ppl"])


def train_method(name: str, spec: dict[str, Any], store: str, out: Path, preset: Preset, args: argparse.Namespace,
                 tokenizer: Path | None, extra: list[str], steps: int, scorer: HeldOutScorer,
                 start_ppl: dict[str, float]) -> dict[str, Any]:
    method = {k: v for k, v in spec.items() if k in ("losses", "online_teacher", "online_full_logits")}
    student: dict[str, Any] = {"init": "teacher_layers", "teacher": args.teacher, "layers": list(preset.student_layers)}
    if spec.get("own_tokenizer"):
        student["tokenizer"] = str(tokenizer)
    cfg = TrainConfig(store=store, out=str(out), student=student, extra_stores=extra, batch_size=preset.batch_size,
                      steps=steps, lr=preset.lr, warmup_steps=max(1, steps // 20), seed=args.seed,
                      checkpoint_every=10**9, log_every=10**9, device=args.device, tensorboard=False,
                      bf16=False if args.fp32 else "auto", **method)
    started, cpu0 = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg)
    model, tok = trainer.student.model, trainer.student.tokenizer
    kind = "foreign" if spec.get("own_tokenizer") else "store"
    if kind not in start_ppl:  # every method starts from the same init: score it once per tokenizer
        start_ppl[kind] = scorer(model, tok)
    curve = [[0, start_ppl[kind]]]
    points = set(eval_steps(steps, preset.eval_points))
    batches, sample_ids, rows_seen, last = trainer.batches(), [], 0, {}
    model.train()
    while trainer.step < steps:
        stats = trainer.train_step(batches)
        sample_ids.append(stats["sample_ids"])
        rows_seen += len(stats["sample_ids"])
        last = {k: v for k, v in stats.items() if isinstance(v, float)}
        if trainer.step in points:
            curve.append([rows_seen * ROW, scorer(model, tok)])
            log(f"    {name} step {trainer.step}/{steps}: held-out ppl {curve[-1][1]:.2f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu0, 1),
            "curve": curve, "sample_ids": sample_ids, "last": last}


def student_store(config: dict[str, Any], student_run: Path) -> str:
    """The `full` store's rows cached with a trained student of this run as the teacher (top-64)."""
    data = {**config, "teacher": {"name": str(student_run), "batch_size": 8}, "signals": {"topk": {"k": 64}}}
    weights = hashlib.sha256((student_run / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    return cached_store(f"quality-student-{student_run.name}-{weights}", data)


def field_bytes(store: str, prefixes: tuple[str, ...]) -> float:
    return sum(v for k, v in summarize(store).field_bytes_per_token().items() if k.startswith(prefixes))


def draw_curves(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if name == "online_full" else "-")
    ax.set_xlabel("student tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def quarter_improvement(curve: list[list[float]]) -> float | None:
    """(ppl at 3/4 of the run − final ppl) / ppl at 3/4 of the run; negative = it rose."""
    if len(curve) < 3:
        return None
    final_x = curve[-1][0]
    q = min(curve[1:], key=lambda p: abs(p[0] - 0.75 * final_x))
    return (q[1] - curve[-1][1]) / q[1]


def largest_rise(curve: list[list[float]]) -> tuple[float, int, int] | None:
    """(rise as a fraction, tokens before, tokens after) of the largest held-out perplexity rise
    between two consecutive evaluations after the first, or None if it never rose."""
    rises = [((b[1] - a[1]) / a[1], int(a[0]), int(b[0])) for a, b in itertools.pairwise(curve[1:]) if b[1] > a[1]]
    return max(rises) if rises else None


def parse_variant(text: str, table: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """NAME:BASE:JSON → (name, base method, its losses): a JSON object is merged into BASE's first
    loss, a JSON list replaces BASE's losses; a bad one exits with one line."""
    name, _, rest = text.partition(":")
    base, _, params = rest.partition(":")
    try:
        loaded = json.loads(params)
    except json.JSONDecodeError as exc:
        sys.exit(f"--variant {text!r}: JSON after NAME:BASE: does not parse ({exc.msg})")
    if not name or name in table or base not in table or not isinstance(loaded, dict | list) or not loaded:
        sys.exit(f"--variant {text!r}: want NEW_NAME:BASE:{{...}} or NEW_NAME:BASE:[losses] with BASE one of "
                 f"{', '.join(table)}")
    base_losses = table[base]["losses"]
    losses = loaded if isinstance(loaded, list) else [{**base_losses[0], **loaded}, *base_losses[1:]]
    try:  # refused here, before any method trains, not when its turn comes
        parse_loss_config(losses, f"--variant {name}")
    except LossConfigError as exc:
        sys.exit(str(exc))
    return name, base, losses


def draws_method(pair: str, table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`N:SCHEME` → method sample{N}_{SCHEME} (plain sampled_kd) and its store's sampled signal."""
    n, _, scheme = pair.partition(":")
    if not n.isdigit() or not 1 <= int(n) <= 255 or scheme not in DRAW_SCHEMES:
        sys.exit(f"--draws-sweep {pair!r}: want N:SCHEME with N in [1, 255] and SCHEME one of {DRAW_SCHEMES}")
    name = f"sample{int(n)}_{scheme}"
    table[name] = {"store": name, "losses": [{"name": "sampled_kd"}]}
    STORE_FIELDS[name] = STORE_FIELDS["sample12"]
    return name, {"n_draws": int(n), "scheme": scheme}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Held-out quality of students trained several epochs from the cache.")
    p.add_argument("--quick", action="store_true", help="8,192 cached tokens, 2 epochs, ce,topk64,hybrid (≤ 10 min)")
    p.add_argument("--methods", help="comma-separated (default: the preset's, all for cpu/cuda)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-points", type=int)
    p.add_argument("--fakd-sweep", default="", help="hidden:attention weights of extra feature_align runs, e.g. 0.5:0.1,1:0.5")
    p.add_argument("--draws-sweep", default="", metavar="N:SCHEME,...",
                   help="extra sampled_kd runs, each from its own store of N draws per token taken by SCHEME "
                        "(multinomial or systematic), e.g. 12:multinomial,48:systematic")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:BASE:JSON",
                   help='another run of method BASE with JSON merged into its first loss, e.g. '
                        'cma_warm:cross_tokenizer_cma:{"projector_warmup_steps":52}, or a JSON list of losses '
                        'replacing its own (repeatable: a sweep)')
    p.add_argument("--teacher", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="student steps in float32 (default: bfloat16 autocast on CUDA and AMX CPUs)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="keep students, curves and the PNG here (default: a temporary folder)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    preset = PRESETS["quick" if args.quick else "cuda" if cuda else "cpu"]
    preset = dataclasses.replace(preset, epochs=args.epochs or preset.epochs, eval_points=args.eval_points or preset.eval_points)
    torch.set_num_threads(args.threads)
    table = methods(preset)
    for pair in filter(None, args.fakd_sweep.split(",")):
        h, a = (float(x) for x in pair.split(":"))
        table[f"feature_align_h{h:g}_a{a:g}"] = {"store": "full", "losses": [feature_align(preset, h, a)]}
        STORE_FIELDS[f"feature_align_h{h:g}_a{a:g}"] = STORE_FIELDS["feature_align"]
    draw_stores = {}
    for pair in filter(None, args.draws_sweep.split(",")):
        name, store = draws_method(pair, table)
        draw_stores[name] = store
    variants = list(draw_stores)
    for text in args.variant:
        name, base, losses = parse_variant(text, table)
        table[name] = {**table[base], "losses": losses}
        STORE_FIELDS[name], variants = STORE_FIELDS[base], [*variants, name]
        if base in COUNTERPART:
            COUNTERPART[name] = COUNTERPART[base]
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else list(preset.methods or table)
    chosen += [m for m in table if (m.startswith("feature_align_h") or m in variants) and m not in chosen]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(table)}")
    chosen = with_dependencies(chosen, table)
    started = time.perf_counter()
    configs = store_configs(preset, args.teacher, draw_stores)
    stores = {key: cached_store(f"quality-{preset.name}-{key}", configs[key])
              for key in sorted({table[m]["store"] for m in chosen} | {"full"})}
    rows = sum(StoreReader(stores["full"]).read_shard(s, ["sample_id"])["sample_id"].size
               for s in StoreReader(stores["full"]).shard_ids())
    steps = max(1, math.ceil(rows * preset.epochs / preset.batch_size))
    log(f"preset {preset.name}: {rows} rows × {ROW} = {rows * ROW:,} cached tokens, {preset.epochs} epochs = {steps} "
        f"steps of {preset.batch_size} rows; student = teacher layers {list(preset.student_layers)}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdcache-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if any(table[m].get("own_tokenizer") for m in chosen):
        from pipeline.train.student_tokenizer import train_store_tokenizer

        tokenizer = root / "student_tokenizer"
        train_store_tokenizer(stores["full"], STUDENT_VOCAB, tokenizer)
    device = torch.device("cuda" if cuda else "cpu")
    scorer = HeldOutScorer(stores["full"], preset.eval_tokens, device)
    trained: dict[str, dict[str, Any]] = {}
    start_ppl: dict[str, float] = {}
    for name in chosen:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        spec, extra = table[name], []
        store = stores[spec["store"]]
        if spec.get("teacher_from"):
            store = stores[name] = student_store(configs["full"], root / spec["teacher_from"])
        if spec.get("second_teacher"):
            extra = [student_store(configs["full"], root / spec["second_teacher"])]
        log(f"--- {name}: {json.dumps(spec['losses'])}")
        trained[name] = train_method(name, spec, store, out, preset, args, tokenizer, extra, steps, scorer, start_ppl)
        log(f"    {name}: {trained[name]['wall_s']} s wall, {trained[name]['cpu_s']} s CPU")
    same_batches = all(t["sample_ids"] == trained[chosen[0]]["sample_ids"] for t in trained.values())
    final = evaluate(EvalConfig(store=stores["full"], out=str(root / "eval"), models={m: str(root / m / "model") for m in chosen},
                                baseline="ce" if "ce" in chosen else None, teacher=args.teacher,
                                max_tokens=preset.eval_tokens, generation=None, device=args.device), progress=log)
    report(args, preset, table, chosen, trained, final, stores, steps, rows, same_batches, root, started)


def report(args, preset, table, chosen, trained, final, stores, steps, rows, same_batches, root, started) -> None:
    models = final["models"]
    bpt = {m: round(field_bytes(stores.get(m, stores[table[m]["store"]] if m in table else stores["full"]),
                                STORE_FIELDS[m]), 1) for m in chosen}
    curves = {m: trained[m]["curve"] for m in chosen}
    png = root / "quality_curves.png"
    draw_curves(curves, png, f"held-out perplexity, {rows * ROW:,} cached tokens × {preset.epochs} epochs, "
                             f"student = teacher layers {list(preset.student_layers)}")
    online = curves.get("online_full")
    print(f"\nquality ({preset.name}): {rows * ROW:,} cached tokens, {preset.epochs} epochs = {steps} steps × "
          f"{preset.batch_size}×{ROW} tokens, {final['heldout_tokens']:,} held-out tokens, same batches: {same_batches}")
    print("(own-tokenizer students: ppl per their own tokens, compare with ce_foreign_tokenizer; bits/byte compares all)\n")
    print("| method | ppl | vs online_full | bits/B | KL→teacher | ECE pts | top-1 agr | B/token | train s (CPU s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ["teacher", *chosen]:
        m = models[name]
        ratio = f"{m['ppl'] / models['online_full']['ppl']:.3f}×" if "online_full" in models and name != "teacher" else "–"
        t = trained.get(name)
        print(f"| {name} | {m['ppl']:.2f} | {ratio} | {m['bits_per_byte']:.3f} | {_f(m.get('kl_to_teacher'), '.4f')} | "
              f"{100 * m['ece']:.2f} | {_f(m.get('top1_agreement'), '.3f')} | {_f(bpt.get(name), '.1f')} | "
              f"{_f(t and t['wall_s'], '.0f')} ({_f(t and t['cpu_s'], '.0f')}) |")
    print("\nheld-out perplexity along the run (student tokens):\n")
    xs = [p[0] for p in curves[chosen[0]]]
    print("| method | " + " | ".join(f"{x:,}" for x in xs) + " |")
    print("|---|" + "---:|" * len(xs))
    for name in chosen:
        print(f"| {name} | " + " | ".join(f"{p[1]:.1f}" for p in curves[name]) + " |")
    if online:
        print("\ngap to online_full along the run (ppl ratio):\n")
        for name in chosen:
            if name != "online_full" and not table.get(name, {}).get("own_tokenizer"):
                print(f"- {name}: " + ", ".join(f"{p[1] / o[1]:.3f}" for p, o in zip(curves[name], online, strict=True)))
    ce_q = quarter_improvement(curves["ce"]) if "ce" in curves else None
    ce_rise = largest_rise(curves["ce"]) if "ce" in curves else None
    if ce_q is not None:
        verdict = "converged" if 0 <= ce_q < 0.02 else ("rising: overfitting" if ce_q < 0 else "not converged")
        print(f"\nCE last-quarter improvement: {100 * ce_q:.2f} % ({verdict})")
    if ce_rise is not None:
        print(f"CE held-out perplexity rose {100 * ce_rise[0]:.1f} % between {ce_rise[1]:,} and {ce_rise[2]:,} "
              "student tokens (overfitting)")
    targets: dict[str, Any] = {}
    for name in chosen:
        base = COUNTERPART.get(name, "ce")
        if name not in ("ce", "ce_foreign_tokenizer", "online_full") and base in models:
            targets[f"{name}_beats_{base}"] = {"value": round(models[name]["ppl"], 3), "limit": round(models[base]["ppl"], 3),
                                               "pass": models[name]["ppl"] < models[base]["ppl"]}
    for key, (a, b, limit) in TARGETS.items():
        if a in models and b in models:
            ratio = models[a]["ppl"] / models[b]["ppl"]
            targets[key] = {"value": round(ratio, 4), "limit": limit, "pass": ratio <= limit}
    for name in ("sample12", "hybrid"):
        if name in models and "online_full" in models:
            gap = 100 * abs(models[name]["ece"] - models["online_full"]["ece"])
            targets[f"{name}_vs_online_full_ece_pts"] = {"value": round(gap, 3), "limit": 0.5, "pass": gap <= 0.5}
    for key, t in targets.items():
        print(f"target {key}: {t['value']} (limit {t['limit']}) {'pass' if t['pass'] else 'MISS'}")
    print(f"\ncurves: {png}")
    summary = {
        "preset": preset.name, "methods": chosen,
        "ppl": {m: round(models[m]["ppl"], 4) for m in ["teacher", *chosen]},
        "ece": {m: round(models[m]["ece"], 5) for m in ["teacher", *chosen]},
        "bytes_per_token": bpt,
        "curve": {m: [[int(x), round(y, 3)] for x, y in c] for m, c in curves.items()},
        "ce_last_quarter_improvement": None if ce_q is None else round(ce_q, 5),
        "ce_largest_rise": None if ce_rise is None else {"fraction": round(ce_rise[0], 5), "from_tokens": ce_rise[1],
                                                          "to_tokens": ce_rise[2]},
        "bits_per_byte": {m: round(models[m]["bits_per_byte"], 4) for m in ["teacher", *chosen]},
        "kl_to_teacher": {m: round(models[m]["kl_to_teacher"], 5) for m in chosen if "kl_to_teacher" in models[m]},
        "targets": targets, "all_targets_pass": all(t["pass"] for t in targets.values()),
        "same_batches": same_batches, "cached_tokens": rows * ROW, "epochs": preset.epochs, "steps": steps,
        "batch": preset.batch_size, "lr": preset.lr, "student_layers": list(preset.student_layers),
        "heldout_tokens": final["heldout_tokens"], "seed": args.seed,
        "train_wall_s": {m: trained[m]["wall_s"] for m in chosen}, "train_cpu_s": {m: trained[m]["cpu_s"] for m in chosen},
        "device": "cuda" if torch.cuda.is_available() and args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "png": str(png), "wall_s": round(time.perf_counter() - started, 1), "students": str(root),
    }
    (root / "quality.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
