"""Each plot writes a real PNG of the house size; training logs are read as the trainer writes
them, torn last line included."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.evaluation.metrics import calibration_bins
from pipeline.evaluation.plots import (
    DPI,
    SIZE,
    plot_bytes_vs_k,
    plot_metrics,
    plot_reliability,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, size: tuple[float, float] = SIZE) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    image = imread(path)
    assert image.shape[:2] == (round(size[1] * DPI), round(size[0] * DPI))
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()  # no figure left open


def write_log(path: Path, steps: int, scale: float, components: tuple[str, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "lr": 1e-3, "tokens_per_s": 1234.5}
        record.update({key: scale * (i + 1) / step for i, key in enumerate(components)})
        lines.append(json.dumps({**record, "sample_ids": [step, step + 1]}))
    path.write_text("\n".join(lines) + '\n{"step": 99, "loss": 0.1', encoding="utf-8")  # torn
    return path


def test_training_curves_from_two_runs(tmp_path: Path) -> None:
    kd = write_log(tmp_path / "kd" / "train_log.jsonl", 30, 1.0, ("loss", "fkl", "ce", "hidden_mse"))
    ce = write_log(tmp_path / "ce" / "train_log.jsonl", 25, 2.0, ("loss", "ce"))
    out = plot_training_curves({"kd": kd, "ce-only": str(ce)}, tmp_path / "new" / "dir" / "c.png")
    assert out == tmp_path / "new" / "dir" / "c.png"
    assert_png(out)
    assert_png(plot_training_curves({"kd": kd, "ce-only": ce}, tmp_path / "fkl.png", keys=["fkl"]))


def test_training_curves_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train_log.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        plot_training_curves({"run": missing}, tmp_path / "x.png")
    bare = write_log(tmp_path / "bare.jsonl", 5, 1.0, ())
    with pytest.raises(ValueError, match="no numeric loss components"):
        plot_training_curves({"run": bare}, tmp_path / "x.png")
    kd = write_log(tmp_path / "kd.jsonl", 5, 1.0, ("loss",))
    with pytest.raises(ValueError, match="rkl"):
        plot_training_curves({"run": kd}, tmp_path / "x.png", keys=["rkl"])
    assert not (tmp_path / "x.png").exists()


def test_metrics_with_missing_values(tmp_path: Path) -> None:
    table = {
        "teacher": {"bleu": 31.2, "chrf": 55.0, "cer": 0.21, "ppl": 9.5},
        "kd student": {"bleu": 24.8, "chrf": 49.1, "cer": 0.3, "ppl": math.nan},
        "ce baseline": {"bleu": 20.1, "cer": 0.35, "ppl": 14.2},
    }
    out = plot_metrics(table, tmp_path / "m" / "metrics.png", ["bleu", "chrf", "cer", "ppl"],
                       title="eval")
    assert_png(out)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_metrics({}, tmp_path / "e.png", ["bleu"])


def test_bytes_vs_k(tmp_path: Path) -> None:
    points = [(64, 150.0, 0.97), (8, 22.0, 0.81), (16, 40.5, 0.88), (32, 77.0, 0.93)]
    assert_png(plot_bytes_vs_k(points, tmp_path / "k" / "bytes.png"))
    with pytest.raises(ValueError):
        plot_bytes_vs_k([], tmp_path / "e.png")


def test_reliability(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.0, 1.0, 2_000)
    bins = {
        "teacher": calibration_bins(conf, rng.uniform(size=conf.size) < conf),
        "student": calibration_bins(conf, rng.uniform(size=conf.size) < conf ** 2),
        "sparse": calibration_bins(np.array([0.9, 0.95]), np.array([1, 0])),
    }
    assert_png(plot_reliability(bins, tmp_path / "r" / "reliability.png"))
    with pytest.raises(ValueError, match="lack"):
        plot_reliability({"bad": {"count": [1]}}, tmp_path / "e.png")
