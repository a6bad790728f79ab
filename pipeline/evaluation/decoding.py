"""How replies and continuations are decoded: greedy, or sampled once per seed and averaged.

A weak student's greedy reply is often one token repeated, or an end of turn at once, and scores
zero whatever its distribution has learned. The dual-space KD paper (and MiniLLM before it)
scores replies sampled at temperature 1 with top-p 1 under several seeds, and averages the
scores over the seeds. Both evaluation paths decode through here, so a seed means the same in
each: the same seed before every model's replies, so their samples are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.evaluation.metrics import score_texts


def decode_runs(seeds: Sequence[int]) -> list[int | None]:
    """One run per seed; one greedy run (None) when no seed is given."""
    return list(seeds) or [None]


def describe(seeds: Sequence[int]) -> str:
    """The decoding in words, for the report."""
    if not seeds:
        return "greedy"
    return f"sampled at temperature 1, top-p 1, once per seed ({', '.join(map(str, seeds))}), scores averaged"


def generate_options(seed: int | None) -> dict[str, Any]:
    """`generate()` keywords for one run; a sampled run seeds torch's generator first."""
    if seed is None:
        return {"do_sample": False, "num_beams": 1, "top_p": None, "top_k": None, "temperature": None}
    torch.manual_seed(seed)
    return {"do_sample": True, "num_beams": 1, "top_p": 1.0, "top_k": 0, "temperature": 1.0}


def scores_over_runs(runs: list[dict[str, list[str]]], references: list[str], teacher: str
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """Each model's texts of each run scored against the references and, beside them, the
    teacher's texts of the same run; each metric is its mean over the runs."""
    per_run: dict[str, dict[str, list[dict[str, float]]]] = {}
    for texts in runs:
        for name, hyp in texts.items():
            scored = per_run.setdefault(name, {})
            scored.setdefault("vs_reference", []).append(score_texts(hyp, references))
            if teacher in texts and name != teacher:
                scored.setdefault("vs_teacher", []).append(score_texts(hyp, texts[teacher]))
    return {name: {what: _mean(r) for what, r in scored.items()} for name, scored in per_run.items()}


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else math.nan  # NaN runs (no CER) left out
    return out
