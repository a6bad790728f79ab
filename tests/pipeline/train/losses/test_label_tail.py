"""`fkl` with `label_tail`: the next token as a free draw from the inside of the teacher's tail.

Its expectation over labels drawn from the teacher is the dense forward KL (plus the constant
P_T·H(r)), in value and gradient; exact at k = V; fused = unfused; bad configs are refused."""

from __future__ import annotations

import pytest
import torch
from loss_batches import topk_batch, topk_signals, valid_mask

from kdstore.spec import StoreSpec, TopKSpec
from pipeline.train.losses import LossConfigError, StudentOutputs, build_loss

V, T = 12, 2  # position 0 has a label (input_ids[1]); position 1 is the row's last: KD only


def _spec(k: int) -> StoreSpec:
    return StoreSpec(vocab_size=V, row_length=T, shard_rows=4, topk=TopKSpec(k=k, logp_step=0.0))


def _batch(teacher: torch.Tensor, k: int, label: int) -> dict[str, torch.Tensor]:
    return topk_batch(torch.log_softmax(teacher, -1), k, sample_ids=torch.zeros(1, dtype=torch.long),
                      input_ids=torch.tensor([[0, label]]))


def _expected_over_labels(teacher: torch.Tensor, student: torch.Tensor, k: int) -> torch.Tensor:
    """E_y[loss] with y ~ the teacher's distribution at position 0: Σ_y p(y) · loss(y), exactly."""
    loss = build_loss({"name": "fkl", "label_tail": 1.0}, _spec(k))
    p = torch.softmax(teacher[0, 0], -1)
    return sum(p[y] * loss(StudentOutputs(student), _batch(teacher, k, y)).total for y in range(V))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expectation_over_labels_is_the_dense_forward_kl(seed):
    """Exact, float64: E_y[loss] = the dense KL at position 0 + P_T·H(r) (r: the renormalised
    tail), averaged with position 1's coarsened KL; the gradient at position 0 is the dense one.
    The coarsened loss alone misses it (the test can fail)."""
    g = torch.Generator().manual_seed(seed)
    k = 4
    teacher = torch.randn(1, T, V, generator=g, dtype=torch.float64) * 2
    student = torch.randn(1, T, V, generator=g, dtype=torch.float64).requires_grad_()
    value = _expected_over_labels(teacher, student, k)
    (grad,) = torch.autograd.grad(value, student)

    lp, lq = torch.log_softmax(teacher[0, 0], -1), torch.log_softmax(student[0, 0], -1)
    dense0 = (lp.exp() * (lp - lq)).sum()
    p = lp.exp()
    tail = p.scatter(-1, p.topk(k).indices, 0.0)
    r = tail / tail.sum()
    tail_entropy = tail.sum() * -(torch.where(r > 0, r * r.clamp_min(1e-300).log(), 0.0)).sum()
    coarse = build_loss({"name": "fkl"}, _spec(k))
    one_row = {key: v[:, 1:] for key, v in _batch(teacher, k, 0).items() if key not in ("sample_id", "input_ids")}
    coarse1 = coarse(StudentOutputs(student[:, 1:]), {**one_row, "sample_id": torch.zeros(1, dtype=torch.long)}).total
    torch.testing.assert_close(value, (dense0 + tail_entropy + coarse1) / 2, atol=1e-12, rtol=0)
    (dense_grad,) = torch.autograd.grad(dense0 / 2, student)
    torch.testing.assert_close(grad[0, 0], dense_grad[0, 0], atol=1e-12, rtol=0)

    (coarse_grad,) = torch.autograd.grad(coarse(StudentOutputs(student), _batch(teacher, k, 0)).total, student)
    assert (coarse_grad[0, 0] - dense_grad[0, 0]).abs().max() > 1e-3


def test_exact_at_k_equal_v():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(1, T, V, generator=g, dtype=torch.float64)
    student = torch.randn(1, T, V, generator=g, dtype=torch.float64)
    batch = _batch(teacher, V, 5)
    with_label = build_loss({"name": "fkl", "label_tail": 1.0}, _spec(V))(StudentOutputs(student), batch).total
    plain = build_loss({"name": "fkl"}, _spec(V))(StudentOutputs(student), batch).total
    assert torch.equal(with_label, plain)


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_fused_matches_unfused_values_and_gradients(weight):
    """Labels inside and outside the head, padding, float64: the fused terms (fkl + sparse CE on
    the label + the student's tail log-mass) against the logits path, atol 1e-10."""
    g = torch.Generator().manual_seed(7)
    B, L, k = 3, 6, 3
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    signals = topk_signals(torch.log_softmax(teacher, -1), k)
    inputs = torch.randint(0, V, (B, L), generator=g)
    inputs[0, 1:4] = signals["topk_ids"][0, :3, 0]  # some labels inside the head
    batch = {"sample_id": torch.arange(B), **signals, "valid": valid_mask(B, L, 2, row=2), "input_ids": inputs}
    hidden = torch.randn(B, L, 5, generator=g, dtype=torch.float64)
    head = torch.randn(V, 5, generator=g, dtype=torch.float64)
    spec = StoreSpec(vocab_size=V, row_length=L, shard_rows=4, topk=TopKSpec(k=k, logp_step=0.0))
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        loss = build_loss([{"name": "fkl", "label_tail": weight}, {"name": "ce", "weight": 0.5}], spec)
        out = StudentOutputs(None, output_head=w, last_hidden=h) if fused else StudentOutputs(h @ w.T)
        value = loss(out, batch).total
        results.append((value.detach(), *torch.autograd.grad(value, (h, w))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    plain = build_loss({"name": "fkl"}, spec)(StudentOutputs(hidden @ head.T), batch).total
    assert results[0][0] > plain  # the label term adds -log s_y > 0


def test_bad_config_is_refused_naming_label_tail():
    for bad in ({"name": "rkl", "label_tail": 1.0}, {"name": "fkl", "label_tail": 1.0, "temperature": 2.0},
                {"name": "fkl", "label_tail": -1.0}):
        with pytest.raises(LossConfigError, match="label_tail"):
            build_loss(bad, _spec(4))
    # a store captured at τ = 2, re-tempered to 1: the cached teacher is not the labels' distribution
    hot = StoreSpec(vocab_size=V, row_length=T, shard_rows=4, topk=TopKSpec(k=4, logp_step=0.0, temperature=2.0))
    with pytest.raises(LossConfigError, match="label_tail needs the cached teacher at temperature 1"):
        build_loss({"name": "fkl", "label_tail": 1.0, "retemper": True}, hot)


def _hybrid_batch(k: int, stored: int, seed: int):
    from kdstore.spec import TailSampleSpec
    from pipeline.capture.extract import tail_draws

    g = torch.Generator().manual_seed(seed)
    B, L = 3, 6
    teacher = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    signals = topk_signals(torch.log_softmax(teacher, -1), k)
    ids = signals["topk_ids"].long()
    t_ids, t_counts = tail_draws(teacher, ids, signals["topk_logp"], stored, 1.0, torch.Generator().manual_seed(seed + 1))
    inputs = torch.randint(0, V, (B, L), generator=g)
    inputs[0, 1:4] = ids[0, :3, 0]
    batch = {"sample_id": torch.arange(B), **signals, "tail_ids": t_ids, "tail_counts": t_counts,
             "valid": valid_mask(B, L, 2, row=2), "input_ids": inputs, "epoch": torch.tensor(1)}
    spec = StoreSpec(vocab_size=V, row_length=L, shard_rows=4, topk=TopKSpec(k=k, logp_step=0.0),
                     tail_sample=TailSampleSpec(n_draws=stored))
    return batch, spec, torch.randn(B, L, 5, generator=g, dtype=torch.float64), torch.randn(V, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("lam,per_step", [(0.5, None), (0.25, 2), (1.0, None)])
def test_hybrid_label_tail_fused_matches_unfused(lam, per_step):
    batch, spec, hidden, head = _hybrid_batch(3, 6, 5)
    config = {"name": "hybrid_kd", "label_tail": lam, **({"draws_per_step": per_step} if per_step else {})}
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        out = StudentOutputs(None, output_head=w, last_hidden=h) if fused else StudentOutputs(h @ w.T)
        value = build_loss(config, spec)(out, batch).total
        results.append((value.detach(), *torch.autograd.grad(value, (h, w))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_hybrid_with_the_label_alone_is_fkl_with_label_tail():
    """λ = 1: the draws carry no weight, and the hybrid is exactly `fkl` + label_tail (value, gradient)."""
    batch, spec, hidden, head = _hybrid_batch(3, 6, 9)
    logits = (hidden @ head.T).requires_grad_()
    a = build_loss({"name": "hybrid_kd", "label_tail": 1.0}, spec)(StudentOutputs(logits), batch).total
    b = build_loss({"name": "fkl", "label_tail": 1.0}, spec)(StudentOutputs(logits), batch).total
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    ga, gb = (torch.autograd.grad(x, logits)[0] for x in (a, b))
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=0)
    with pytest.raises(LossConfigError, match="label_tail"):
        build_loss({"name": "hybrid_kd", "label_tail": 1.5}, spec)
