"""`bench/draw_noise.py`: its exact systematic-draw tables agree with Monte Carlo over the real
`draw`, sorting the vocabulary keeps every id's marginal, and the budget allocations spend no
more distinct ids than fixed N."""

from __future__ import annotations

import numpy as np
import torch

from bench import draw_noise as bench


def _probs(positions: int = 48, vocab: int = 40) -> torch.Tensor:
    logits = torch.randn(positions, vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.0
    return torch.softmax(logits, -1)


def test_exact_tables_match_monte_carlo_and_sorting_keeps_marginals():
    probs, n, repeats = _probs(), 6, 4000
    distinct, error = bench.systematic_tables(probs, 8)
    generator = torch.Generator().manual_seed(0)
    sums = {s: torch.zeros_like(probs) for s in ("systematic", "systematic_sorted")}
    sq_err = {s: 0.0 for s in sums}
    hits = 0.0
    for _ in range(repeats):
        for scheme in sums:
            est = bench.estimate(probs, n, scheme, generator)
            assert torch.allclose(est.sum(-1), torch.ones(len(probs), dtype=est.dtype))
            sums[scheme] += est / repeats
            sq_err[scheme] += ((est - probs) ** 2).sum(-1).mean().item() / repeats
            if scheme == "systematic":
                hits += (est > 0).sum(-1).double().mean().item() / repeats
    assert abs(hits - distinct[:, n - 1].mean()) < 0.05
    for scheme in sums:
        assert (sums[scheme] - probs).abs().max() < 0.02, scheme  # unbiased per id, either order
        assert abs(sq_err[scheme] - error[:, n - 1].mean()) < 0.05 * error[:, n - 1].mean(), scheme


def test_allocations_stay_within_fixed_budget():
    distinct, error = bench.systematic_tables(_probs(), 64)
    per_token, optimal = bench.allocations(distinct, error, 6)
    budget = distinct[:, 5].mean()
    assert per_token["scheme"] == "per_token_budget" and per_token["distinct"] <= budget
    assert optimal["scheme"] == "optimal" and budget * 0.97 <= optimal["distinct"] <= budget
    assert optimal["target_err"] <= error[:, 5].mean() * 1.02
    assert np.isfinite([per_token["target_err"], optimal["target_err"]]).all()
