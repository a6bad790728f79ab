"""Fused output losses (last hidden state + head, chunk by chunk) against the float64 dense
references of loss_batches, and against the unfused path.

Gradients are w.r.t. the hidden state and the head (the fused losses never see logits).
Tolerances: float64 atol 1e-9 (values and gradients); float32 1e-5 against the float64 reference;
bf16 inputs: fused vs unfused on the same bf16 hidden/head, rtol 2e-2 (both round the logits to
bf16; the gradients are summed over chunks in another order, then rounded to bf16).
"""

from __future__ import annotations

import pytest
import torch
from loss_batches import NAMES, B, T, V, make_case, reference_loss, uniform_draws

from pipeline.train.losses import StudentOutputs, WeightedSum
from pipeline.train.losses.fused import fused_output_loss
from pipeline.train.losses.output import CrossEntropyLoss, DistributionLoss
from pipeline.train.losses.sampled import SampledKDLoss

D = 16


def hidden_and_head(seed: int = 3, dtype=torch.float64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    h = scale * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    return h.to(dtype), w.to(dtype)


def grads(fn, h, w):
    """(value, ∂/∂hidden, ∂/∂head) of fn(hidden, head)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    value = fn(h, w)
    gh, gw = torch.autograd.grad(value, (h, w))
    return value.detach(), gh, gw


def fused(loss):
    return lambda h, w: loss(StudentOutputs(None, output_head=w, last_hidden=h), BATCH[0]).total


def unfused(loss):
    return lambda h, w: loss(StudentOutputs(h @ w.T), BATCH[0]).total


BATCH: list = [None]  # the batch the closures above read (set per test)


def assert_all_close(got, want, atol, rtol=0.0):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k,top_p", [(V, None), (7, None), (7, 0.6), (1, None)])
def test_fused_divergence_matches_dense_float64_reference(name, k, top_p):
    teacher, _, batch = make_case(k=k, top_p=top_p, seed=k)
    BATCH[0] = batch
    h, w = hidden_and_head()
    want = grads(lambda h, w: reference_loss(name, teacher, h @ w.T, batch, coarse=k < V), h, w)
    got = grads(fused(DistributionLoss(name)), h, w)
    assert want[0].item() > 0
    assert_all_close(got, want, atol=1e-9)
    # float32 hidden and head (a float32 store batch): 1e-5 of the float64 reference
    batch32 = {**batch, "topk_logp": batch["topk_logp"].float(), "topk_tail": batch["topk_tail"].float()}
    BATCH[0] = batch32
    got32 = grads(fused(DistributionLoss(name)), h.float(), w.float())
    assert got32[0].dtype == torch.float32
    assert_all_close(got32, want, atol=1e-5)


@pytest.mark.parametrize("loss", [SampledKDLoss(), CrossEntropyLoss(), SampledKDLoss(temperature=2.0),
                                  DistributionLoss("js", temperature=2.0, teacher_power=0.5)], ids=lambda x: x.label)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_unfused(loss, dtype):
    _, _, batch = make_case(k=7, seed=2)
    BATCH[0] = uniform_draws(batch)
    h, w = hidden_and_head(dtype=dtype)
    atol = 1e-9 if dtype == torch.float64 else 1e-5
    assert_all_close(grads(fused(loss), h, w), grads(unfused(loss), h, w), atol=atol)


def test_weighted_sum_is_one_pass_with_the_unfused_components():
    """fkl + rkl at τ 2 + CE + sampled KD: one fused call, same total, components (names included)
    and gradients as the unfused sum."""
    teacher, _, batch = make_case(k=7, top_p=0.6, seed=4)
    batch = BATCH[0] = uniform_draws(batch)
    loss = WeightedSum([(0.3, DistributionLoss("fkl")), (0.7, CrossEntropyLoss()),
                        (0.2, DistributionLoss("rkl", temperature=2.0)), (0.1, SampledKDLoss()),
                        (0.5, WeightedSum([(1.0, DistributionLoss("fkl")), (2.0, DistributionLoss("tvd"))]))])
    assert loss.fusable
    h, w = hidden_and_head()
    assert_all_close(grads(fused(loss), h, w), grads(unfused(loss), h, w), atol=1e-9)
    got = loss(StudentOutputs(None, output_head=w, last_hidden=h), batch).components
    want = loss(StudentOutputs(h @ w.T), batch).components
    assert list(got) == list(want) == ["fkl", "ce", "rkl", "sampled_kd", "fkl#2", "tvd"]
    assert_all_close(got.values(), want.values(), atol=1e-9)


def test_chunking_and_skipped_rows_do_not_change_results():
    """Chunks of 1, 3 and all tokens agree; padding tokens get exactly zero hidden gradients."""
    _, _, batch = make_case(k=7, seed=1, invalid_tail=3)
    terms_of = DistributionLoss("akl").fused_terms
    h, w = hidden_and_head()
    results = []
    for chunk in (1, 3, B * T):
        x = h.detach().clone().requires_grad_(True)
        total, values = fused_output_loss(x, w, terms_of(batch, 1.0, V, torch.float64), chunk_size=chunk)
        total.backward()
        results.append((total.detach(), x.grad))
    for total, grad in results[1:]:
        assert_all_close((total, grad), results[0], atol=1e-12)
    assert (results[0][1][~batch["valid"]] == 0).all() and (results[0][1][batch["valid"]] != 0).any()


@pytest.mark.parametrize("spread", [40.0, 50.0])
def test_tail_exact_when_kept_mass_is_one_to_float_precision(spread):
    """Kept logits +s, others -s: the student tail is ~59·e^{-2s} (1e-33 and 2e-42, the second in
    float32 subnormals): the dropped-id log-sum-exp path. Head = identity, so hidden = logits."""
    teacher, _, batch = make_case(k=5, invalid_tail=0)
    batch = {**batch, "topk_logp": batch["topk_logp"].float(), "topk_tail": batch["topk_tail"].float()}
    BATCH[0] = batch
    logits = torch.full((B, T, V), -spread, dtype=torch.float64).scatter(-1, batch["topk_ids"].long(), spread)
    logits[0, 0] = 0.0  # one ordinary row
    eye = torch.eye(V, dtype=torch.float64)
    for name in NAMES:
        want = grads(lambda h, w, name=name: reference_loss(name, teacher, h @ w.T, batch, coarse=True), logits, eye)
        got = grads(fused(DistributionLoss(name)), logits.float(), eye.float())
        assert all(torch.isfinite(x).all() for x in got), name
        assert_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("garbage", [False, True])
def test_all_padding_batch_gives_exact_zero_and_zero_grads(garbage):
    _, _, batch = make_case(k=7, top_p=0.6)
    batch = BATCH[0] = uniform_draws({**batch, "valid": torch.zeros(B, T, dtype=torch.bool)})
    if garbage:
        batch["topk_logp"] = torch.full_like(batch["topk_logp"], float("-inf"))
        batch["topk_tail"] = torch.full_like(batch["topk_tail"], float("nan"))
        batch["draw_counts"] = torch.zeros_like(batch["draw_counts"])
    h, w = hidden_and_head(dtype=torch.float32)
    for loss in [DistributionLoss(n) for n in NAMES] + [SampledKDLoss(), CrossEntropyLoss()]:
        value, gh, gw = grads(fused(loss), h, w)
        assert value.item() == 0.0 and (gh == 0).all() and (gw == 0).all(), loss.label


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_fused_matches_unfused(autocast):
    """bf16 hidden and head (autocast off), or float32 ones under CPU bf16 autocast: fused and
    unfused agree (rtol 2e-2), gradients come back in the inputs' dtypes, all finite."""
    teacher, _, batch = make_case(k=7, top_p=0.8, invalid_tail=1)
    batch = BATCH[0] = uniform_draws({**batch, "topk_logp": batch["topk_logp"].float(),
                                       "topk_tail": batch["topk_tail"].float()})
    h, w = hidden_and_head(dtype=torch.float32 if autocast else torch.bfloat16, scale=3.0)
    for loss in [DistributionLoss(n) for n in NAMES] + [SampledKDLoss(), CrossEntropyLoss()]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, want = grads(fused(loss), h, w), grads(unfused(loss), h, w)
        assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype, loss.label
        assert all(torch.isfinite(x.float()).all() for x in got), loss.label
        for a, b in zip(got, want, strict=True):
            scale = b.float().abs().max().clamp_min(1e-3)
            assert ((a.float() - b.float()).abs().max() / scale).item() < 2e-2, loss.label


def test_fused_needs_hidden_and_head():
    _, _, batch = make_case(k=7)
    with pytest.raises(ValueError, match="last hidden state"):
        DistributionLoss("fkl")(StudentOutputs(None, output_head=torch.zeros(V, D)), batch)


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    _, _, batch = make_case(k=7, seed=6)
    BATCH[0] = batch
    h, w = hidden_and_head()
    want = grads(fused(DistributionLoss("rkl")), h, w)
    got = grads(lambda h, w: -2.5 * fused(DistributionLoss("rkl"))(h, w), h, w)
    assert_all_close(got[1:], [-2.5 * g for g in want[1:]], atol=1e-12)
    x = h.detach().clone().requires_grad_(True)
    total = fused(DistributionLoss("rkl"))(x, w)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        total.backward()
