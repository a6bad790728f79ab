"""Bytes per token against perplexity: which store is the cheapest that keeps a student at online
full KD's quality (issue 29's "half the bytes").

    python -m bench.quality_frontier runs/quality-bytes/quality.json runs/online/quality.json ... \
        [--out runs/frontier] [--png bench/results/quality_frontier_cpu.png] [--rewrite 64:19]

Reads the `quality.json` of any number of `bench.quality` runs (same preset, seed and threads, so
their students compare) and joins them by method name. Every point keeps the split of each of its
figures: validation for every method and sweep point (what a choice reads), test only for the
methods a run reported. The reference is `online_full` on the same split. A point is on the
frontier when no cheaper point has a lower validation perplexity. Bytes/token are those of the
files each method reads, as the bench stored them (16-row shards, whose fixed per-file cost is
part of the figure); `--rewrite 64:19` re-writes each store's rows (lossless) at 64 rows per
shard and zstd 19, as `kdcache cache` can write them, and uses those bytes instead.

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
from bench.store_fields import rewrite

REFERENCE = "online_full"
TARGETS = {"sampled": 8.0, "hybrid": 32.0}  # kind: bytes/token limit, at ≤ 1.00× online on test
RATIO_LIMIT = 1.0


def store_files(store: dict[str, Any]) -> list[str]:
    """The file groups a method reads: quality.json's `files`, else those of its store's signals."""
    if store.get("files"):
        return store["files"]
    signals = store.get("signals") or {}
    groups = (("topk", "topk_"), ("sampled", "draws"), ("tail_sample", "tail_draws"))
    return ["tokens", *(group for key, group in groups if signals.get(key))] if signals else []


def store_kind(store: dict[str, Any]) -> str | None:
    """What a method reads: sampled (draws alone), hybrid (head + tail draws) or topk; so sample12
    on the full store counts as sampled. None for the tokens alone (ce) or when the run did not say."""
    kinds = (("tail_draws", "hybrid"), ("topk_", "topk"), ("draws", "sampled"))
    files = store_files(store)
    return next((kind for group, kind in kinds if group in files), None)


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
                "store": store, "recipe": run.get("recipes", {}).get(name),
                "source": run["_source"],
                "sweep_point": name in run.get("sweeps", []) and test is None,
            }
    return {"reference": {"method": REFERENCE, "validation_ppl": ref[SWEEP_SPLIT], "test_ppl": ref[REPORT_SPLIT]},
            "points": list(points.values())}


def relayout(points: list[dict[str, Any]], shard_rows: int, level: int) -> None:
    """Each point's bytes/token with its store's rows re-written at `shard_rows` rows per shard
    and zstd `level` (lossless, `bench.store_fields.rewrite`); the bench's own figure is kept as
    `bytes_per_token_as_stored`. A point whose store is gone keeps its own figure, flagged."""
    done: dict[str, dict[str, float]] = {}
    for p in points:
        p["bytes_per_token_as_stored"] = p["bytes_per_token"]
        path = p["store"].get("path")
        if not path or not Path(path, "store.json").is_file():
            p["layout"] = None
            continue
        if path not in done:
            done[path] = rewrite(path, shard_rows, level)
        files = tuple(store_files(p["store"]))
        p["bytes_per_token"] = round(sum(v for k, v in done[path].items() if k.startswith(files)), 2)
        p["layout"] = {"shard_rows": shard_rows, "zstd_level": level}


def mark_frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sorted by bytes; on the frontier when no cheaper point has a lower validation perplexity."""
    best = float("inf")
    points = sorted(points, key=lambda p: (p["bytes_per_token"], p["validation_ppl"] or float("inf")))
    for point in points:
        point["on_frontier"] = point["validation_ppl"] is not None and point["validation_ppl"] < best
        best = min(best, point["validation_ppl"] or best)
    return points


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
    p.add_argument("--rewrite", metavar="ROWS:LEVEL",
                   help="bytes/token of each store re-written at ROWS rows per shard and zstd LEVEL, e.g. 64:19 "
                        "(`kdcache cache`'s default shard size); the bench's own figure is kept beside")
    args = p.parse_args(argv)
    layout = None
    if args.rewrite:
        rows, _, level = args.rewrite.partition(":")
        if not (rows.isdigit() and level.isdigit() and int(rows) >= 1 and 1 <= int(level) <= 22):
            sys.exit(f"--rewrite {args.rewrite!r}: want ROWS:LEVEL, ROWS ≥ 1 and LEVEL in [1, 22], e.g. 64:19")
        layout = (int(rows), int(level))
    runs = load_runs(args.runs)
    result = frontier_points(runs)
    if layout:
        relayout(result["points"], *layout)
    result["points"] = mark_frontier(result["points"])
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
