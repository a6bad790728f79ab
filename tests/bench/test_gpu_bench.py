"""`python -m bench.gpu --smoke`: the GPU benchmark's own code on CPU with tiny shapes (what CI can
run of it): every figure is there and finite, the chunked reference equals the fused loss, and
the idle-share arithmetic is an interval union."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import SHAPES, TARGETS, busy_union, flops_per_token

REPO = Path(__file__).resolve().parents[2]


def test_busy_union_counts_overlaps_once_and_clips_to_the_window():
    assert busy_union([(0, 4), (2, 6), (8, 9), (5, 7)], 1, 10) == pytest.approx(7.0)  # [1,7) and [8,9)
    assert busy_union([], 0, 5) == 0.0
    assert busy_union([(3, 20)], 0, 10) == pytest.approx(7.0)


def test_flops_per_token_of_the_8b_shape_is_about_16_gflop():
    """The issue's figure: an 8 B forward in bf16 is about 16 GFLOP/token; the head ~6.5 % of it."""
    shape = SHAPES["llama-3.1-8b"]
    flops = flops_per_token(shape, 1024)
    assert 14.5e9 < flops < 16.5e9
    assert 0.06 < 1 - flops_per_token(shape, 1024, head=False) / flops < 0.075


@pytest.mark.slow
def test_smoke_run_prints_every_figure_and_the_targets():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["smoke"] and not result["targets_apply"] and result["device"].startswith("cpu")
    for figures in result["teacher_pass"].values():
        for case in ("bare_logits", "bare_no_head", "topk64", "topk64+sampled12"):
            assert figures[case]["tokens_per_s"] > 0
        assert 0.0 <= figures["idle_share"] <= 1.0
    for mode in ("ce", "kd"):
        assert result["student"][mode]["step_s"] > 0 and result["student"][mode]["fused"]
        assert 0.0 <= result["student"][mode]["wait_share"] < 1.0
    loss = result["loss"]
    assert loss["value_rel_diff"] < 1e-5 and loss["grad_rel_diff"] < 1e-4  # the reference is the same math
    assert math.isfinite(loss["fused"]["value"]) and loss["fused"]["s"] > 0
    assert set(result["targets"]) == set(TARGETS)
    assert all(isinstance(t["pass"], bool) and t["value"] is not None for t in result["targets"].values())
    assert result["all_targets_pass"] == all(t["pass"] for t in result["targets"].values())
    assert "| target |" in done.stdout
