"""Scores for `kdcache eval`: text metrics of generations and calibration of next-token confidence.

Text metrics come from maintained libraries, so numbers match what other papers and tools report:
BLEU, chrF and TER from sacrebleu, ROUGE-L from `rouge_score`, character error rate from jiwer.
Calibration (ECE and reliability bins) is a few lines of numpy. Nothing here imports torch, so
the module loads fast in the CLI and in notebooks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_BINS = 15


def _check_texts(hypotheses: list[str], references: list[str]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists of strings, not one string")
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses as references, at least one: got "
                         f"{len(hypotheses)} hypotheses and {len(references)} references")


def score_texts(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level text metrics of `hypotheses` against one reference each.

    Returns `bleu`, `chrf`, `ter` on sacrebleu's 0-100 scale (BLEU with effective order, so short
    texts without 4-gram matches are not all zero), `rougeL` = mean ROUGE-L F-measure over the
    pairs ×100, and `cer` = character error rate as a fraction (edits / reference characters
    over the whole list; 0 = identical, may exceed 1).

    Library behaviour kept as is: rouge_score's default tokenizer lowercases and drops every
    character outside [a-z0-9], so text without such characters (and a pair of empty strings)
    scores rougeL 0. Empty references: jiwer 3 refuses them and jiwer 4 counts their hypothesis
    as insertions against zero characters, so to score the same on both, CER is computed over
    the pairs whose reference is not empty after stripping whitespace (BLEU, chrF, TER and
    rougeL still use every pair); `cer` is `nan` when every reference is empty.
    """
    from jiwer import cer
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer
    from sacrebleu.metrics import BLEU, CHRF, TER

    _check_texts(hypotheses, references)
    refs = [list(references)]
    # The tokenizer is passed explicitly: without one, rouge-score logs "Using default tokenizer"
    # through absl, which calls logging.basicConfig() and leaves a root handler on the stderr of
    # the moment in the caller's process (a closed stream, later, under a test's capture).
    scorer = RougeScorer(["rougeL"], tokenizer=DefaultTokenizer(use_stemmer=False))
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references,
                                                                        strict=True)]
    kept = [(h, r) for h, r in zip(hypotheses, references, strict=True) if r.strip()]
    char_error = (float(cer(reference=[r for _, r in kept], hypothesis=[h for h, _ in kept]))
                  if kept else math.nan)
    return {
        "bleu": float(BLEU(effective_order=True).corpus_score(hypotheses, refs).score),
        "chrf": float(CHRF().corpus_score(hypotheses, refs).score),
        "ter": float(TER().corpus_score(hypotheses, refs).score),
        "rougeL": 100.0 * float(np.mean(rouge)),
        "cer": char_error,
    }


def _check_calibration(confidence: np.ndarray, correct: np.ndarray,
                       bins: int) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence and correct must have the same shape: got {conf.shape} "
                         f"and {hit.shape}")
    if conf.size == 0:
        raise ValueError("confidence and correct are empty: nothing to calibrate")
    if not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not np.all((conf >= 0.0) & (conf <= 1.0)):  # also catches nan
        bad = conf[~((conf >= 0.0) & (conf <= 1.0))].ravel()[0]
        raise ValueError(f"confidence must lie in [0, 1], found {bad}")
    return conf.ravel(), hit.ravel().astype(np.float64)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Equal-width reliability bins over [0, 1]: bin 0 is [0, 1/B], bin i is (i/B, (i+1)/B].

    `confidence` (probabilities) and `correct` (bool or 0/1) have the same shape, any rank.
    Returns plain lists, one entry per bin: `edges` (B+1 floats), `count` (ints), `confidence`
    (mean confidence) and `accuracy` (mean correctness), `nan` for an empty bin; and `ece`, the
    expected calibration error as a fraction (see `expected_calibration_error`).
    """
    conf, hit = _check_calibration(confidence, correct, bins)
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    # Number of interior edges strictly below c: c on an edge falls in the bin that edge closes.
    index = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=bins) / count
        accuracy = np.bincount(index, weights=hit, minlength=bins) / count
    gaps = np.abs(accuracy - mean_conf)[count > 0]
    ece = float(np.sum(count[count > 0] / conf.size * gaps))
    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": accuracy.tolist(),
        "ece": ece,
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = DEFAULT_BINS) -> float:
    """ECE = Σ_b (n_b / N)·|accuracy_b − mean confidence_b| over equal-width bins of [0, 1]
    (as in `calibration_bins`), as a fraction in [0, 1]; 0 = perfectly calibrated."""
    return float(calibration_bins(confidence, correct, bins)["ece"])
