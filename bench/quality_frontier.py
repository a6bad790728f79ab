"""Bytes per token against perplexity: which store is the cheapest that keeps a student at online
full KD's quality (issue 29's "half the bytes").

    python -m bench.quality_frontier runs/quality-bytes/quality.json runs/online/quality.json ... \
        [--out runs/frontier] [--png docs/img/quality_frontier_cpu.png]

Reads the `quality.json` of any number of `bench.quality` runs (same preset, seed and threads, so
their students compare) and joins them by method name. Every point keeps the split of each of its
figures: validation for every method and sweep point (what a choice reads), test only for the
methods a run reported. The reference is `online_full` on the same split. A point is on the
frontier when no cheaper point has a lower validation perplexity.

Targets (V = 49,152): a sampled store (draws alone) at ≤ 1.00× online on test within 8 B/token,
and a hybrid store (top-k head + tail draws) at ≤ 1.00× within 32 B/token. A target with no
point scored on test is reported as not scored, never as met.

Writes `<out>/quality_frontier.json` and the PNG; prints a table and, last, the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.quality_report import REPORT_SPLIT, SWEEP_SPLIT

REFERENCE = "online_full"
TARGETS = {"sampled": 8.0, "hybrid": 32.0}  # kind: bytes/token limit, at ≤ 1.00× online on test
RATIO_LIMIT = 1.0


def store_kind(store: dict[str, Any]) -> str | None:
    """What a method reads: sampled (draws alone), hybrid (head + tail draws) or topk; from the
    file groups it reads (`files`), so sample12 on the full store counts as sampled; else from the
    store's signals. None when the run said neither."""
    files, signals = store.get("files"), store.get("signals") or {}
    if not files:  # a quality.json written before `files`: the store's own signals
        files = [g for key, g in (("topk", "topk_"), ("sampled", "draws"), ("tail_sample", "tail_draws")) if signals.get(key)]
    kinds = (("tail_draws", "hybrid"), ("topk_", "topk"), ("draws", "sampled"))
    return next((kind for group, kind in kinds if group in (files or ())), None)  # ce: the tokens alone


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        try:
            runs.append({**json.loads(path.read_text()), "_source": str(path)})
        except (OSError, json.JSONDecodeError) as exc:
            sys.exit(f"{path}: not a readable quality.json ({exc})")
    return runs


def reference(runs: list[dict[str, Any]], split: str) -> float | None:
    for run in runs:
        ppl = run["validation"]["ppl"] if split == SWEEP_SPLIT else run["ppl"]
        if REFERENCE in ppl:
            return float(ppl[REFERENCE])
    return None


def frontier_points(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One point per method (its store and validation figure from the first run that has it, its test
figure from any run that reported it), with the frontier flag."""
    ref = {split: reference(runs, split) for split in (SWEEP_SPLIT, REPORT_SPLIT)}
    if ref[SWEEP_SPLIT] is None:
        sys.exit(f"no run has {REFERENCE!r}: run `python -m bench.quality --methods {REFERENCE} --out DIR` and pass its JSON")
    points: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, bpt in run["bytes_per_token"].items():
            if name == REFERENCE or name in points:
                continue
            store = run.get("stores", {}).get(name, {})
            val = run["validation"]["ppl"].get(name)
            test = next((r["ppl"][name] for r in runs if name in r["ppl"]), None)  # a sweep run has none
            points[name] = {
                "name": name, "bytes_per_token": bpt, "kind": store_kind(store),
                "validation_ppl": val, "test_ppl": test,
                "vs_online_validation": None if val is None else round(val / ref[SWEEP_SPLIT], 4),
                "vs_online_test": None if test is None or ref[REPORT_SPLIT] is None else round(test / ref[REPORT_SPLIT], 4),
                "splits": {"validation_ppl": SWEEP_SPLIT, "test_ppl": REPORT_SPLIT if test is not None else None},
                "store_signals": store.get("signals"), "recipe": run.get("recipes", {}).get(name),
                "source": run["_source"],
                "sweep_point": name in run.get("sweeps", []) and test is None,
            }
    best = float("inf")
    for point in sorted(points.values(), key=lambda p: (p["bytes_per_token"], p["validation_ppl"] or float("inf"))):
        point["on_frontier"] = point["validation_ppl"] is not None and point["validation_ppl"] < best
        best = min(best, point["validation_ppl"] or best)
    return {"reference": {"method": REFERENCE, "validation_ppl": ref[SWEEP_SPLIT], "test_ppl": ref[REPORT_SPLIT]},
            "points": sorted(points.values(), key=lambda p: p["bytes_per_token"])}


def targets(points: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for kind, limit in TARGETS.items():
        scored = [p for p in points if p["kind"] == kind and p["vs_online_test"] is not None]
        met = [p for p in scored if p["bytes_per_token"] <= limit and p["vs_online_test"] <= RATIO_LIMIT]
        best = min(met, key=lambda p: p["bytes_per_token"]) if met else None
        out[f"{kind}_at_{limit:g}_B"] = {
            "bytes_limit": limit, "ratio_limit": RATIO_LIMIT, "split": REPORT_SPLIT,
            "verdict": "met" if met else ("missed" if scored else "not scored on test"),
            "point": best and best["name"], "scored_points": [p["name"] for p in scored],
        }
    return out


def draw(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"sampled": "tab:blue", "hybrid": "tab:orange", "topk": "tab:green", None: "tab:gray"}
    for p in result["points"]:
        c = colours[p["kind"]]
        if p["vs_online_validation"] is not None:
            ax.scatter(p["bytes_per_token"], p["vs_online_validation"], color=c, marker="o", facecolors="none", s=30)
            ax.annotate(p["name"], (p["bytes_per_token"], p["vs_online_validation"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if p["vs_online_test"] is not None:
            ax.scatter(p["bytes_per_token"], p["vs_online_test"], color=c, marker="*", s=80)
    front = [p for p in result["points"] if p["on_frontier"]]
    ax.plot([p["bytes_per_token"] for p in front], [p["vs_online_validation"] for p in front], color="k", lw=0.8, alpha=0.5)
    ax.axhline(RATIO_LIMIT, color="k", ls="--", lw=0.8)
    for kind, limit in TARGETS.items():
        ax.axvline(limit, color=colours[kind], ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per token (signals read + tokens)")
    ax.set_ylabel(f"perplexity / {REFERENCE}'s (same split)")
    ax.set_title("o validation (sweep points), * test (chosen); blue sampled, orange hybrid", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="quality.json files of bench.quality runs")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for quality_frontier.json")
    p.add_argument("--png", type=Path, help="the PNG (default: <out>/quality_frontier_cpu.png)")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    result = frontier_points(runs)
    result["targets"] = targets(result["points"])
    result["runs"] = [{"source": r["_source"], "preset": r["preset"], "seed": r["seed"], "device": r["device"],
                       "steps": r["steps"]} for r in runs]
    if len({(r["preset"], r["seed"], r["steps"]) for r in runs}) > 1:
        sys.exit(f"runs differ in preset, seed or steps: {result['runs']}")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.png or args.out / "quality_frontier_cpu.png"
    draw(result, png)
    result["png"] = str(png)
    print(f"| method | kind | B/token | {SWEEP_SPLIT} ppl | vs online | {REPORT_SPLIT} ppl | vs online | frontier |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    ref = result["reference"]
    print(f"| {REFERENCE} | reference | – | {ref['validation_ppl']:.2f} | 1 | {_f(ref['test_ppl'])} | 1 | |")
    for q in result["points"]:
        print(f"| {q['name']} | {q['kind']} | {q['bytes_per_token']:.1f} | {_f(q['validation_ppl'])} | "
              f"{_f(q['vs_online_validation'], '.3f')} | {_f(q['test_ppl'])} | {_f(q['vs_online_test'], '.3f')} | "
              f"{'yes' if q['on_frontier'] else ''} |")
    for key, t in result["targets"].items():
        print(f"target {key} (≤ {t['ratio_limit']:.2f}× online on {t['split']}): {t['verdict']}"
              + (f" by {t['point']}" if t["point"] else ""))
    (args.out / "quality_frontier.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


def _f(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
