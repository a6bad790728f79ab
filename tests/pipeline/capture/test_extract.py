"""Signal extraction against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.capture import extract


def _logits(shape=(2, 5, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


def test_topk_matches_dense_reference(monkeypatch):
    monkeypatch.setattr(extract, "TOKEN_CHUNK", 3)  # several chunks, one ragged
    logits = _logits()
    ids, logp, tail = extract.topk_logprobs(logits, k=7)
    ref = torch.log_softmax(logits.double(), dim=-1)
    ref_vals, ref_ids = ref.topk(7, dim=-1)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(logp.double(), ref_vals, atol=1e-5)
    assert torch.all(logp[..., :-1] >= logp[..., 1:])
    assert torch.allclose(tail.double(), 1 - ref_vals.exp().sum(-1), atol=1e-6)


def test_temperature_and_tiny_tail():
    logits = _logits()
    _, logp, _ = extract.topk_logprobs(logits, k=4, temperature=2.0)
    ref = torch.log_softmax(logits.double() / 2.0, -1).topk(4, -1).values
    assert torch.allclose(logp.double(), ref, atol=1e-5)
    peaked = torch.zeros(1, 1, 50)
    peaked[..., 3] = 40.0  # all mass on one id: tail ~ 49·e^-40 must not be swallowed by rounding
    _, _, tail = extract.topk_logprobs(peaked, k=1)
    assert 0 < tail.item() < 1e-15


def test_top_p_cap_keeps_exact_tail():
    logits = _logits()
    ids, logp, tail = extract.topk_logprobs(logits, k=20, top_p=0.5)
    probs = logp.exp()
    kept = torch.isfinite(logp)
    before = torch.cumsum(probs, -1) - probs
    assert torch.all(before[kept] < 0.5)
    assert torch.all(kept[..., 0])  # the top-1 is always kept
    assert torch.allclose(tail, 1 - probs.sum(-1), atol=1e-5)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_sampled_draws_unique_and_counts(scheme):
    logits = _logits((3, 4, 40))
    g = torch.Generator().manual_seed(1)
    ids, counts = extract.sampled_draws(logits, 12, 1.0, g, scheme)
    assert ids.shape == counts.shape == (3, 4, 12)
    assert torch.all(counts.sum(-1) == 12)
    for i, c in zip(ids.reshape(-1, 12), counts.reshape(-1, 12), strict=True):
        n = int((c > 0).sum())
        assert torch.all(c[:n] > 0) and torch.all(c[n:] == 0)  # padding only at the end
        assert len(set(i[:n].tolist())) == n


def test_sampled_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 4000, 3)
    ids, counts = extract.sampled_draws(logits, 10, 1.0, torch.Generator().manual_seed(0))
    total = torch.zeros(3)
    total.scatter_add_(0, ids.reshape(-1), counts.reshape(-1).float())
    freq = total / total.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.01)


def _estimate(ids: torch.Tensor, counts: torch.Tensor, vocab: int) -> torch.Tensor:
    """count / n per id, dense [..., vocab]."""
    dense = torch.zeros(*ids.shape[:-1], vocab, dtype=torch.float64)
    return dense.scatter_add_(-1, ids.long(), counts.double()) / counts.sum(-1, keepdim=True).double()


def test_systematic_counts_are_floor_or_ceil_of_n_p(monkeypatch):
    monkeypatch.setattr(extract, "CDF_CHUNK", 7)  # several cumulative-sum blocks, one ragged
    logits = _logits((2, 30, 300))
    n = 12
    ids, counts = extract.sampled_draws(logits, n, 1.5, torch.Generator().manual_seed(3), "systematic")
    expected = n * torch.softmax(logits.double() / 1.5, -1)
    got = n * _estimate(ids, counts, 300)
    assert torch.all(got >= expected.floor() - 1e-9) and torch.all(got <= expected.ceil() + 1e-9)
    assert torch.all(counts.sum(-1) == n)


def test_systematic_draws_are_unbiased_and_beat_multinomial_variance():
    """Mean of count/n over N positions of one distribution vs p: within 5 standard errors for
    every id (systematic: SE ≤ 1/(2n√N)); and its squared error per position is below multinomial's."""
    N, n, vocab = 4000, 12, 40
    logits = (2 * torch.randn(vocab, generator=torch.Generator().manual_seed(0))).expand(1, N, vocab)
    p = torch.softmax(logits[0, 0].double(), -1)
    errors = {}
    for scheme in ("multinomial", "systematic"):
        ids, counts = extract.sampled_draws(logits, n, 1.0, torch.Generator().manual_seed(1), scheme)
        est = _estimate(ids, counts, vocab)[0]
        floor = 1 / (20 * n * math.sqrt(N))  # a tenth of systematic's SE bound: ids it always draws alike have std 0
        se = est.std(0) / math.sqrt(N) + floor
        assert torch.all((est.mean(0) - p).abs() < 5 * se), scheme
        errors[scheme] = ((est - p) ** 2).sum(-1).mean().item()
    assert errors["systematic"] < 0.5 * errors["multinomial"]


def test_systematic_tail_draws_stay_in_the_tail():
    logits = _logits((1, 50, 200))
    ids, logp, _ = extract.topk_logprobs(logits, k=5)
    t_ids, t_counts = extract.tail_draws(logits, ids, logp, 8, 1.0, torch.Generator().manual_seed(2), "systematic")
    assert torch.all(t_counts.sum(-1) == 8)
    drawn = torch.zeros(1, 50, 200, dtype=torch.bool).scatter_(-1, t_ids.long(), t_counts > 0)
    assert not drawn.gather(-1, ids).any()
    tail = torch.softmax(logits.double(), -1).scatter(-1, ids, 0.0)
    expected = 8 * tail / tail.sum(-1, keepdim=True)
    got = 8 * _estimate(t_ids, t_counts, 200)
    assert torch.all(got >= expected.floor() - 1e-9) and torch.all(got <= expected.ceil() + 1e-9)
