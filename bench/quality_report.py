"""What the quality benchmark (`bench/quality.py`) prints and writes: the table, the curves, the
targets and the JSON, each figure labelled with the split that produced it.

Kept apart from the training loop so that the split of every figure is decided in one place:
the table, the curves and the targets come from the test split; the sweep points and the
validation column (what a choice of weight or recipe reads) from the validation split.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.quality_methods import COUNTERPART, STORE_FIELDS, TARGETS
from kdstore.summary import summarize

ROW = 256
SWEEP_SPLIT = "validation"  # every sweep point and every choice of weight or recipe
REPORT_SPLIT = "test"  # the table, the curves and the targets


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
    ax.set_ylabel(f"{REPORT_SPLIT} perplexity")
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


def targets_of(models: dict[str, Any], names: list[str]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for name in names:
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
    return targets


def print_curves(curves: dict[str, list[list[float]]], table: dict[str, Any], split: str) -> None:
    first = next(iter(curves))
    xs = [p[0] for p in curves[first]]
    print(f"\n{split} perplexity along the run (student tokens):\n")
    print("| method | " + " | ".join(f"{x:,}" for x in xs) + " |")
    print("|---|" + "---:|" * len(xs))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{p[1]:.1f}" for p in curve) + " |")
    online = curves.get("online_full")
    if online:
        print(f"\ngap to online_full along the run ({split} ppl ratio):\n")
        for name, curve in curves.items():
            if name != "online_full" and not table.get(name, {}).get("own_tokenizer"):
                print(f"- {name}: " + ", ".join(f"{p[1] / o[1]:.3f}" for p, o in zip(curve, online, strict=True)))


def report(run: Any, reported: list[str], sweeps: list[str], trained: dict[str, dict[str, Any]],
           finals: dict[str, dict[str, Any]], rows: int, same_batches: bool, started: float) -> dict[str, Any]:
    """Print the tables and return the JSON summary (also written to `<root>/quality.json`).
    `finals[split]` is `evaluate`'s result on that split: test for `reported`, validation for all."""
    args, preset, table, stores, root = run.args, run.preset, run.table, run.stores, run.root
    test = finals.get(REPORT_SPLIT, {"models": {}, "heldout_tokens": 0})
    val = finals[SWEEP_SPLIT]
    chosen = [*reported, *sweeps]
    bpt = {m: round(field_bytes(stores.get(m, stores[table[m]["store"]]), STORE_FIELDS[m]), 1) for m in chosen}
    curves = {m: trained[m]["curve"] for m in reported}
    sweep_curves = {m: trained[m]["curve"] for m in sweeps}
    png = root / "quality_curves.png"
    if curves:
        draw_curves(curves, png, f"{REPORT_SPLIT} perplexity, {rows * ROW:,} cached tokens × {preset.epochs} epochs, "
                                 f"student = teacher layers {list(preset.student_layers)}")
    models = test["models"]
    print(f"\nquality ({preset.name}): {rows * ROW:,} cached tokens, {preset.epochs} epochs = {run.steps} steps × "
          f"{preset.batch_size}×{ROW} tokens, {test['heldout_tokens']:,} test tokens, {val['heldout_tokens']:,} "
          f"validation tokens, same batches: {same_batches}")
    print("(own-tokenizer students: ppl per their own tokens, compare with ce_foreign_tokenizer; bits/byte compares all)\n")
    if models:
        print(f"{REPORT_SPLIT} split (the table):\n")
        print("| method | ppl | vs online_full | bits/B | KL→teacher | ECE pts | top-1 agr | B/token | train s (CPU s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in ["teacher", *reported]:
            m = models[name]
            ratio = f"{m['ppl'] / models['online_full']['ppl']:.3f}×" if "online_full" in models and name != "teacher" else "–"
            t = trained.get(name)
            print(f"| {name} | {m['ppl']:.2f} | {ratio} | {m['bits_per_byte']:.3f} | {_f(m.get('kl_to_teacher'), '.4f')} | "
                  f"{100 * m['ece']:.2f} | {_f(m.get('top1_agreement'), '.3f')} | {_f(bpt.get(name), '.1f')} | "
                  f"{_f(t and t['wall_s'], '.0f')} ({_f(t and t['cpu_s'], '.0f')}) |")
    vm = val["models"]
    print(f"\n{SWEEP_SPLIT} split (every choice of weight or recipe reads these; sweep points have no test figure):\n")
    print("| method | sweep point | ppl | vs online_full | ECE pts | B/token |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ["teacher", *chosen]:
        ratio = f"{vm[name]['ppl'] / vm['online_full']['ppl']:.3f}×" if "online_full" in vm and name != "teacher" else "–"
        print(f"| {name} | {'yes' if name in sweeps else ''} | {vm[name]['ppl']:.2f} | {ratio} | "
              f"{100 * vm[name]['ece']:.2f} | {_f(bpt.get(name), '.1f')} |")
    if curves:
        print_curves(curves, table, REPORT_SPLIT)
    if sweep_curves:
        print_curves(sweep_curves, table, SWEEP_SPLIT)
    ce_q = quarter_improvement(curves["ce"]) if "ce" in curves else None
    ce_rise = largest_rise(curves["ce"]) if "ce" in curves else None
    if ce_q is not None:
        verdict = "converged" if 0 <= ce_q < 0.02 else ("rising: overfitting" if ce_q < 0 else "not converged")
        print(f"\nCE last-quarter improvement ({REPORT_SPLIT}): {100 * ce_q:.2f} % ({verdict})")
    if ce_rise is not None:
        print(f"CE {REPORT_SPLIT} perplexity rose {100 * ce_rise[0]:.1f} % between {ce_rise[1]:,} and {ce_rise[2]:,} "
              "student tokens (overfitting)")
    targets = targets_of(models, reported)
    for key, t in targets.items():
        print(f"target {key}: {t['value']} (limit {t['limit']}) {'pass' if t['pass'] else 'MISS'}")
    if curves:
        print(f"\ncurves: {png}")
    summary = {
        "preset": preset.name, "methods": reported, "sweeps": sweeps,
        "splits": {key: REPORT_SPLIT for key in ("ppl", "ece", "bits_per_byte", "kl_to_teacher", "curve", "targets",
                                                   "ce_last_quarter_improvement", "ce_largest_rise", "png")}
                  | {"validation": SWEEP_SPLIT},
        "ppl": {m: round(models[m]["ppl"], 4) for m in models},
        "ece": {m: round(models[m]["ece"], 5) for m in models},
        "bytes_per_token": bpt,
        "curve": {m: [[int(x), round(y, 3)] for x, y in c] for m, c in curves.items()},
        "ce_last_quarter_improvement": None if ce_q is None else round(ce_q, 5),
        "ce_largest_rise": None if ce_rise is None else {"fraction": round(ce_rise[0], 5), "from_tokens": ce_rise[1],
                                                          "to_tokens": ce_rise[2]},
        "bits_per_byte": {m: round(models[m]["bits_per_byte"], 4) for m in models},
        "kl_to_teacher": {m: round(models[m]["kl_to_teacher"], 5) for m in models if "kl_to_teacher" in models[m]},
        "targets": targets, "all_targets_pass": all(t["pass"] for t in targets.values()),
        "validation": {"ppl": {m: round(vm[m]["ppl"], 4) for m in vm}, "ece": {m: round(vm[m]["ece"], 5) for m in vm},
                       "curve": {m: [[int(x), round(y, 3)] for x, y in c] for m, c in sweep_curves.items()},
                       "tokens": val["heldout_tokens"]},
        "recipes": {m: table[m]["losses"] for m in chosen},
        "stores": {m: {"path": stores.get(m, stores[table[m]["store"]]),
                       **{k: run.configs.get(table[m]["store"], {}).get(k) for k in ("signals", "zstd_level")},
                       "files": list(STORE_FIELDS[m])}
                   for m in chosen},
        "same_batches": same_batches, "cached_tokens": rows * ROW, "epochs": preset.epochs, "steps": run.steps,
        "batch": preset.batch_size, "lr": preset.lr, "student_layers": list(preset.student_layers),
        "test_tokens": test["heldout_tokens"], "validation_tokens": val["heldout_tokens"], "seed": args.seed,
        "train_wall_s": {m: trained[m]["wall_s"] for m in chosen}, "train_cpu_s": {m: trained[m]["cpu_s"] for m in chosen},
        "device": "cuda" if torch.cuda.is_available() and args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "png": str(png) if curves else None, "wall_s": round(time.perf_counter() - started, 1), "students": str(root),
    }
    (root / "quality.json").write_text(json.dumps(summary, indent=1))
    return summary


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
