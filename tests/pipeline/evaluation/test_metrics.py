"""Text metrics against sacrebleu and hand-computed values; ECE on crafted inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from pipeline.evaluation.metrics import calibration_bins, expected_calibration_error, score_texts

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Knowledge distillation trains a small student from a large teacher model.",
    "A cached teacher is run once, and many students learn from its stored outputs.",
]


def test_identical_texts_score_perfectly() -> None:
    scores = score_texts(SENTENCES, SENTENCES)
    assert set(scores) == {"bleu", "chrf", "ter", "rougeL", "cer"}
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert scores["ter"] == pytest.approx(0.0)
    assert scores["rougeL"] == pytest.approx(100.0)
    assert scores["cer"] == pytest.approx(0.0)
    assert all(isinstance(v, float) for v in scores.values())


def test_disjoint_texts_score_badly() -> None:
    scores = score_texts(["alpha beta gamma delta", "epsilon zeta"], ["one two three four", "xy"])
    assert scores["bleu"] < 1.0
    assert scores["rougeL"] == 0.0
    assert scores["ter"] >= 100.0
    assert scores["cer"] > 0.5


def test_known_cer_and_rouge_values() -> None:
    assert score_texts(["abcd"], ["abce"])["cer"] == pytest.approx(0.25)
    # Corpus CER = all edits / all reference characters: (1 + 2) / (4 + 2).
    assert score_texts(["abcd", "x"], ["abce", "yz"])["cer"] == pytest.approx(0.5)
    # LCS 3 of 3 hypothesis and 4 reference tokens: F = 2·1·0.75 / 1.75.
    rouge = score_texts(["the cat sat"], ["the cat sat down"])["rougeL"]
    assert rouge == pytest.approx(100 * 1.5 / 1.75)


def test_matches_sacrebleu() -> None:
    hyps = ["The quick brown fox jumped over a lazy dog by the river bank.",
            "Knowledge distillation trains small students from large teachers.",
            "A cached teacher runs once and many students learn from it."]
    scores = score_texts(hyps, SENTENCES)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [SENTENCES]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [SENTENCES]).score)
    assert scores["ter"] == pytest.approx(sacrebleu.corpus_ter(hyps, [SENTENCES]).score)
    # Too short for a 4-gram: effective order keeps BLEU informative, as sacrebleu computes it.
    short = score_texts(["a cat"], ["a cat sat"])["bleu"]
    expected = sacrebleu.corpus_bleu(["a cat"], [["a cat sat"]], use_effective_order=True).score
    assert short == pytest.approx(expected) and short > 0


def test_empty_references_do_not_crash() -> None:
    scores = score_texts(["abcd", "something"], ["abce", ""])
    assert scores["cer"] == pytest.approx(0.25)  # the pair with an empty reference is left out
    assert all(math.isfinite(scores[k]) for k in ("bleu", "chrf", "ter", "rougeL"))
    assert math.isnan(score_texts(["abc", ""], ["", "  "])["cer"])
    assert score_texts([""], ["abc"])["cer"] == pytest.approx(1.0)


def test_bad_text_inputs() -> None:
    with pytest.raises(ValueError, match="2 hypotheses and 3 references"):
        score_texts(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="0 hypotheses and 0 references"):
        score_texts([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        score_texts("abc", "abd")  # type: ignore[arg-type]


def test_ece_on_crafted_inputs() -> None:
    assert expected_calibration_error(np.ones(10), np.ones(10, dtype=bool)) == pytest.approx(0.0)
    correct = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(np.full(10, 0.8), correct) == pytest.approx(0.0)
    half = np.array([True, False] * 5)
    assert expected_calibration_error(np.full(10, 0.9), half) == pytest.approx(0.4)
    # Two bins: [0, .5] holds .2, .3 (mean .25, accuracy .5); (.5, 1] holds .7, .9 (mean .8,
    # accuracy 1). ECE = ½·|.5 − .25| + ½·|1 − .8| = .225.
    conf = np.array([0.2, 0.3, 0.7, 0.9])
    assert expected_calibration_error(conf, np.array([1, 0, 1, 1]), bins=2) == pytest.approx(0.225)
    # Any shape, flattened alike.
    assert expected_calibration_error(conf.reshape(2, 2), np.array([[1, 0], [1, 1]]),
                                      bins=2) == pytest.approx(0.225)


def test_calibration_bins_edges_and_empty_bins() -> None:
    conf = np.array([0.0, 0.25, 0.5, 0.51, 1.0])
    bins = calibration_bins(conf, np.array([0, 0, 1, 1, 1]), bins=4)
    assert bins["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # 0 and the edge 0.25 fall in the first bin, 0.5 closes the second, 1.0 is in the last.
    assert bins["count"] == [2, 1, 1, 1]
    assert bins["confidence"] == pytest.approx([0.125, 0.5, 0.51, 1.0])
    assert bins["accuracy"] == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert bins["ece"] == pytest.approx((2 * 0.125 + 0.5 + 0.49 + 0.0) / 5)
    sparse = calibration_bins(np.array([0.95, 0.97]), np.array([1, 1]))
    assert len(sparse["count"]) == 15 and sum(sparse["count"]) == 2
    assert math.isnan(sparse["confidence"][0]) and math.isnan(sparse["accuracy"][0])


def test_bad_calibration_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        expected_calibration_error(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error(np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([0.5, 1.5]), np.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_bins(np.array([np.nan]), np.ones(1))
    with pytest.raises(ValueError, match="bins"):
        calibration_bins(np.ones(2), np.ones(2), bins=0)


def test_scoring_leaves_the_callers_logging_alone():
    """In a fresh process (pytest's own handlers would hide it): scoring installs no root handler."""
    import subprocess
    import sys

    code = ("import logging; from pipeline.evaluation.metrics import score_texts; "
            "score_texts(['a cat sat'], ['the cat sat']); print(len(logging.root.handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.stdout.strip() == "0", done.stderr
