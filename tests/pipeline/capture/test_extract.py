"""Signal extraction against dense float64 references."""

from __future__ import annotations

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


def test_sampled_draws_unique_and_counts():
    logits = _logits((3, 4, 40))
    g = torch.Generator().manual_seed(1)
    ids, counts = extract.sampled_draws(logits, 12, 1.0, g)
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
