"""PNG figures for the eval report: training curves, metric tables, store cost against k, and
reliability diagrams.

Figures are drawn on matplotlib's Agg canvas through the object API (`Figure`), never through
pyplot: no window can open, the global backend of a notebook is left alone, no figure stays in
pyplot's registry, and plotting is safe from the threads of Prefect's thread task runner.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (8.0, 4.5)  # inches
DPI = 110
NOT_COMPONENTS = frozenset({"step", "lr", "tokens_per_s", "tokens"})


def _figure(size: tuple[float, float] = SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()
    return path


def _grid(fig: Figure, n: int, max_cols: int) -> list[Any]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of one train_log.jsonl that have a numeric step; torn or bad lines skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    return records


def plot_training_curves(logs: dict[str, str | Path], out: str | Path,
                         keys: Sequence[str] | None = None) -> Path:
    """One subplot per loss component, one line per run (legend = the key in `logs`).

    Components are the numeric keys of the records other than step, lr, tokens_per_s and
    tokens, in first-seen order, or only `keys`. Returns the path of the PNG written to `out`.
    """
    if not logs:
        raise ValueError("no training logs to plot")
    runs = {label: _read_log(Path(path)) for label, path in logs.items()}
    found: dict[str, None] = {}
    for records in runs.values():
        for record in records:
            found.update((k, None) for k, v in record.items()
                         if k not in NOT_COMPONENTS and _is_number(v))
    if keys is not None:
        missing = [k for k in keys if k not in found]
        if missing:
            raise ValueError(f"loss components {missing} are in none of the logs "
                             f"{[str(p) for p in logs.values()]}; found {list(found)}")
        components = list(keys)
    else:
        components = list(found)
    if not components:
        raise ValueError(f"no numeric loss components in {[str(p) for p in logs.values()]}")
    cols = min(3, math.ceil(math.sqrt(len(components))))  # up to 6 components fit SIZE
    rows = math.ceil(len(components) / cols)
    fig = _figure(SIZE if rows <= 2 else (SIZE[0], SIZE[1] / 2 * rows))
    for ax, key in zip(_grid(fig, len(components), cols), components, strict=True):
        for i, (label, records) in enumerate(runs.items()):
            points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
            if points:  # one colour per run in every subplot
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label, linewidth=1.2, color=f"C{i % 10}")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), fontsize="small", loc="upper right")
    return _save(fig, out)


def plot_metrics(table: dict[str, dict[str, float]], out: str | Path,
                 metrics: Sequence[str], title: str = "", log_scale: Sequence[str] = ()) -> Path:
    """One small bar chart per metric, one bar per model (`table[model][metric]`); a missing or
    NaN value leaves its bar out and is marked "n/a"; metrics in `log_scale` get a log y axis
    (perplexities of a teacher and a weak student differ by orders of magnitude)."""
    if not table or not metrics:
        raise ValueError(f"nothing to plot: {len(table)} models, {len(metrics)} metrics")
    models = list(table)
    colors = [f"C{i % 10}" for i in range(len(models))]
    fig = _figure()
    for ax, metric in zip(_grid(fig, len(metrics), 4), metrics, strict=True):
        for i, model in enumerate(models):
            value = table[model].get(metric)
            if value is None or not math.isfinite(value):
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize="small", color="grey")
                continue
            ax.bar(i, value, color=colors[i], label=model)
            ax.annotate(f"{value:.3g}", (i, value), ha="center", va="bottom", fontsize="x-small",
                        xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(metric)
        if metric in log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_bytes_vs_k(points: Sequence[tuple[int, float, float]], out: str | Path) -> Path:
    """Store cost and fidelity against k: bytes/token on the left axis, mean kept probability
    mass on the right, k on a log2 axis. `points` are (k, bytes_per_token, kept_mass)."""
    if not points:
        raise ValueError("no (k, bytes_per_token, kept_mass) points to plot")
    ordered = sorted(points)
    if ordered[0][0] < 1:
        raise ValueError(f"k must be a positive integer, got {ordered[0][0]}")
    ks = [p[0] for p in ordered]
    fig = _figure()
    ax = fig.subplots()
    left = ax.plot(ks, [p[1] for p in ordered], "o-", color="C0", label="bytes / token")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (kept ids per token)")
    ax.set_ylabel("bytes / token", color="C0")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    right = twin.plot(ks, [p[2] for p in ordered], "s--", color="C1", label="kept mass")
    twin.set_ylabel("mean kept probability mass", color="C1")
    ax.legend(handles=left + right, loc="center right")
    return _save(fig, out)


def plot_reliability(bins_by_model: dict[str, dict], out: str | Path) -> Path:
    """Reliability diagram from `pipeline.evaluation.metrics.calibration_bins` outputs, one line per model
    (accuracy against mean confidence of each non-empty bin, with the diagonal), and beside it the
    share of predictions in each bin. Returns the path of the PNG."""
    if not bins_by_model:
        raise ValueError("no calibration bins to plot")
    fig = _figure()
    ax, hist = fig.subplots(1, 2, width_ratios=[3, 2])
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for i, (model, bins) in enumerate(bins_by_model.items()):
        missing = [k for k in ("edges", "count", "confidence", "accuracy") if k not in bins]
        if missing:
            raise ValueError(f"calibration bins of {model!r} lack {missing}")
        kept = [(c, a) for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"],
                                          strict=True) if n > 0]
        label = model if "ece" not in bins else f"{model} (ECE {bins['ece']:.3f})"
        if kept:
            conf, acc = zip(*kept, strict=True)
            ax.plot(conf, acc, "o-", color=f"C{i % 10}", label=label, markersize=4)
        edges, total = bins["edges"], max(sum(bins["count"]), 1)
        hist.stairs([n / total for n in bins["count"]], edges, color=f"C{i % 10}", label=model)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", aspect="equal")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(alpha=0.3)
    hist.set(xlim=(0, 1), xlabel="confidence", ylabel="share of predictions")
    hist.grid(alpha=0.3)
    return _save(fig, out)
