"""`bench.train`: its two steppers take the same optimizer step on the same batch (so the KD / CE
ratios they time compare the same work), and its paired-round figures are what they claim."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from bench.paired import gap_figures, median_interval, ratio_figures
from bench.train_steppers import HFStepper, KdcacheStepper, same_batches


def test_median_interval_is_the_narrowest_with_95_percent_coverage():
    def coverage(n: int, j: int) -> float:
        return sum(math.comb(n, i) for i in range(j + 1, n - j)) / 2**n

    for n in range(6, 61):
        lo, hi = median_interval(list(range(n)))
        assert hi == n - 1 - lo and coverage(n, lo) >= 0.95, n
        assert 2 * (lo + 1) >= n - 1 or coverage(n, lo + 1) < 0.95, n  # one step narrower is too narrow
    assert median_interval([1.0, 3.0, 2.0]) == (1.0, 3.0)  # too few rounds for 95 %: the range


def test_paired_figures_cancel_what_a_round_shares():
    # a neighbour slows whole rounds (by up to 3x); within a round, kd costs 1.04 x ce in both trainers
    slow = [1.0, 3.0, 1.1, 0.9, 2.2, 1.0, 1.05, 2.9, 1.0, 0.95]
    times = {"ce": slow, "kd": [1.04 * s for s in slow], "hf-ce": [0.9 * s for s in slow],
             "hf-kd": [0.9 * 1.04 * s for s in slow]}
    times["kd"][1] *= 1.5  # one step hit by a burst of its own
    r = ratio_figures(times, times, "kd", "ce")
    assert r["paired"] == pytest.approx(1.04) and r["rounds"] == 10
    assert (r["ci95_lo"], r["ci95_hi"]) == (pytest.approx(1.04), pytest.approx(1.04))  # the burst falls outside
    assert r["best"] == pytest.approx(1.04) and r["of_medians"] == pytest.approx(1.04)
    gap = gap_figures(times, ("hf-kd", "hf-ce"), ("kd", "ce"))
    assert gap["paired"] == pytest.approx(0.0, abs=1e-12) and gap["ci95_hi"] == pytest.approx(0.0, abs=1e-12)
    times["hf-kd"] = [1.01 * t for t in times["hf-kd"]]  # KDTrainer's KD step 1 % dearer: a gap of 0.0104
    assert gap_figures(times, ("hf-kd", "hf-ce"), ("kd", "ce"))["paired"] == pytest.approx(0.0104)


@pytest.mark.slow
def test_kdcache_and_kdtrainer_steppers_take_the_same_steps(tmp_path, tiny_teacher_dir):
    store = str(cache_short_docs(tmp_path / "store", tiny_teacher_dir, write_short_docs(tmp_path)))
    args = argparse.Namespace(teacher=str(tiny_teacher_dir), batch_size=2, seed=0, device="cpu", bf16=None,
                              student_layers=1)
    ours = KdcacheStepper("kd", store, str(tmp_path / "ours"), args, 1)
    hf = HFStepper("hf-kd", store, str(tmp_path / "hf"), args, 1)
    assert ours.fused and hf.fused
    pools = {"kd": ours.batches(3), "hf-kd": hf.batches(3)}
    assert same_batches(pools)
    first = next(ours.student.model.parameters()).detach().clone()
    for i in range(3):
        ours.step(pools["kd"][i])
        hf.step(pools["hf-kd"][i])
    # the same fused AdamW on both sides (HF's default optimizer)
    assert ours.trainer.optimizer.param_groups[0]["fused"] and hf.trainer.optimizer.param_groups[0]["fused"]
    theirs = dict(hf.model.named_parameters())
    for name, p in ours.student.model.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(next(ours.student.model.parameters()), first)  # the steps moved the weights
    altered = {"kd": pools["kd"], "hf-kd": [dict(b) for b in pools["hf-kd"]]}
    altered["hf-kd"][2]["topk_logp"] = altered["hf-kd"][2]["topk_logp"] + 1e-3
    assert not same_batches(altered)
