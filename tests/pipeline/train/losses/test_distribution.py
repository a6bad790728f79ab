"""Output-distribution losses against dense float64 references.

The references are written independently of the implementation: dense softmaxes, coarsened by
hand onto (kept ids + one tail bucket), textbook formulas. Tolerances: atol 1e-9 in float64
(values and gradients w.r.t. the student logits), 1e-5 in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_batches import (
    NAMES,
    B,
    T,
    V,
    coarsen,
    make_case,
    reference_loss,
    uniform_draws,
    value_and_grad,
    xlogy_kl,
)

from kdstore.spec import SampledSpec, StoreSpec, TopKSpec
from pipeline.capture import extract
from pipeline.train.losses import StudentOutputs, build_loss
from pipeline.train.losses.coarse import coarse_live, student_coarse, teacher_coarse
from pipeline.train.losses.output import (
    TEACHER_LOGP,
    CrossEntropyLoss,
    DistributionLoss,
)
from pipeline.train.losses.sampled import SampledKDLoss


@pytest.mark.parametrize("name", NAMES)
def test_k_equals_vocab_matches_dense_float64(name):
    teacher, student, batch = make_case(k=V)
    loss = DistributionLoss(name)
    got, got_grad = value_and_grad(lambda x: loss(StudentOutputs(x), batch).total, student)
    want, want_grad = value_and_grad(lambda x: reference_loss(name, teacher, x, batch, coarse=False), student)
    assert got.item() > 0
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_online_full_teacher_logp_gives_the_dense_loss(name):
    """Online full-logit KD: a batch carrying the teacher's full log-probs gets the dense
    divergence (values and gradients), whatever its top-k fields say (here k = 3)."""
    teacher, student, batch = make_case(k=3, seed=5)
    loss = DistributionLoss(name)
    full = {**batch, TEACHER_LOGP: teacher}
    got, got_grad = value_and_grad(lambda x: loss(StudentOutputs(x), full).total, student)
    want, want_grad = value_and_grad(lambda x: reference_loss(name, teacher, x, batch, coarse=False), student)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-9, rtol=0)
    coarse = loss(StudentOutputs(student), batch).total
    assert abs(coarse.item() - got.item()) > 1e-6  # the top-3 coarsening differs: the dense path was taken


def test_online_full_retemper_is_exact():
    teacher, student, batch = make_case(k=3)
    got = DistributionLoss("fkl", temperature=2.0, teacher_power=0.5)(StudentOutputs(student), {**batch, TEACHER_LOGP: teacher}).total
    want = xlogy_kl(torch.softmax(teacher / 2.0, -1), torch.softmax(student / 2.0, -1))[batch["valid"]].mean()
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k,top_p", [(1, None), (7, None), (7, 0.6)])
def test_k_below_vocab_matches_coarsened_float64(name, k, top_p):
    teacher, student, batch = make_case(k=k, top_p=top_p, seed=k)
    if top_p is not None:
        assert (~torch.isfinite(batch["topk_logp"])).any(), "the case must hold top-p padding"
    loss = DistributionLoss(name)
    got, got_grad = value_and_grad(lambda x: loss(StudentOutputs(x), batch).total, student)
    want, want_grad = value_and_grad(lambda x: reference_loss(name, teacher, x, batch, coarse=True), student)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_float32_store_batch_from_extract_matches_dense(name):
    """A batch as the teacher pass writes it (float32, extract.topk_logprobs) with k = V."""
    teacher, student, batch = make_case(k=V)
    ids, logp, tail = extract.topk_logprobs(teacher.float(), V)
    batch = {**batch, "topk_ids": ids.int(), "topk_logp": logp, "topk_tail": tail}
    loss = DistributionLoss(name)
    got, got_grad = value_and_grad(lambda x: loss(StudentOutputs(x), batch).total, student.float())
    want, want_grad = value_and_grad(lambda x: reference_loss(name, teacher, x, batch, coarse=False), student)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=0)


def test_student_tail_is_exact_when_kept_mass_tends_to_one():
    """log1p(-exp(lse_kept)) would give log(0) here; the tail must match float64 to 1e-4."""
    teacher, _, batch = make_case(k=5, invalid_tail=0)
    ids = batch["topk_ids"].long()
    logits = torch.full((B, T, V), -30.0).scatter(-1, ids, 30.0)  # tail ≈ 59 · e^-60 ≈ 5e-25
    live = coarse_live(batch["topk_logp"].float(), batch["valid"], V)
    got = student_coarse(logits, ids, live, 1.0, torch.float32)[..., -1]
    want = torch.log(coarsen(torch.softmax(logits.double(), -1), ids, live[..., :-1])[..., -1])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    for name in NAMES:
        x = logits.clone().requires_grad_(True)
        value = DistributionLoss(name)(StudentOutputs(x), {**batch, "topk_logp": batch["topk_logp"].float(), "topk_tail": batch["topk_tail"].float()}).total
        value.backward()
        ref = reference_loss(name, teacher, logits.double(), batch, coarse=True)
        assert torch.isfinite(value) and torch.isfinite(x.grad).all(), name
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5)


def _all_losses():
    return [DistributionLoss(n) for n in NAMES] + [SampledKDLoss(), CrossEntropyLoss()]


@pytest.mark.parametrize("garbage", [False, True])
def test_all_padding_batch_gives_exact_zero_and_zero_grads(garbage):
    _, student, batch = make_case(k=7, top_p=0.6)
    batch = uniform_draws({**batch, "valid": torch.zeros(B, T, dtype=torch.bool)})
    if garbage:  # what a writer might leave at padding: -inf log-probs, zero tails, NaN
        batch["topk_logp"] = torch.full_like(batch["topk_logp"], float("-inf"))
        batch["topk_tail"] = torch.full_like(batch["topk_tail"], float("nan"))
        batch["draw_counts"] = torch.zeros_like(batch["draw_counts"])
    for loss in _all_losses():
        x = student.float().clone().requires_grad_(True)
        total = loss(StudentOutputs(x), batch).total
        total.backward()
        assert total.item() == 0.0, loss.label
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all(), loss.label


def test_bf16_logits_stay_finite():
    teacher, student, batch = make_case(k=7, top_p=0.8, invalid_tail=1)
    batch = uniform_draws({**batch, "topk_logp": batch["topk_logp"].float(), "topk_tail": batch["topk_tail"].float()})
    for loss in _all_losses():
        x = (8 * student).bfloat16().requires_grad_(True)
        result = loss(StudentOutputs(x), batch)
        result.total.backward()
        ref = loss(StudentOutputs((8 * student).bfloat16().float()), batch).total
        assert result.total.dtype == torch.float32 and torch.isfinite(result.total), loss.label
        assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all(), loss.label
        torch.testing.assert_close(result.total, ref)


def test_teacher_is_renormalised_over_buckets_when_quantised():
    teacher, _, batch = make_case(k=6, invalid_tail=0)
    quantised = torch.round(batch["topk_logp"] * 16) / 16  # as LogQuant with step 1/16
    live = coarse_live(quantised, batch["valid"], V)
    lt = teacher_coarse(quantised, batch["topk_tail"], live, torch.float64)
    torch.testing.assert_close(lt.exp().sum(-1), torch.ones(B, T, dtype=torch.float64))
    assert (DistributionLoss("fkl")(StudentOutputs(teacher), {**batch, "topk_logp": quantised}).total >= 0)


def test_retemper_with_k_equals_vocab_is_exact():
    """τ = 2 on a cache captured at 1: teacher p^(1/2) renormalised is exact when k = V."""
    teacher, student, batch = make_case(k=V)
    loss = DistributionLoss("fkl", temperature=2.0, teacher_power=0.5)
    got = loss(StudentOutputs(student), batch).total
    p = torch.softmax(teacher / 2.0, -1)
    want = xlogy_kl(p, torch.softmax(student / 2.0, -1))[batch["valid"]].mean()
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_build_loss_applies_retemper_from_store_capture_temperature():
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=V, temperature=2.0, logp_step=0))
    teacher, student, batch = make_case(k=V)
    same = build_loss({"name": "fkl", "temperature": 2.0}, spec)
    assert same.teacher_power == 1.0
    other = build_loss({"name": "fkl", "temperature": 4.0, "retemper": True}, spec)
    assert other.teacher_power == 0.5


# ---------------------------------------------------------------- sampled KD


def test_sampled_kd_equals_exact_formula_on_crafted_input():
    logits = torch.randn(1, 2, 6, dtype=torch.float64)
    batch = {
        "valid": torch.tensor([[True, True]]),
        "draw_ids": torch.tensor([[[1, 3, 0], [5, 0, 0]]], dtype=torch.int32),
        "draw_counts": torch.tensor([[[2, 1, 0], [3, 0, 0]]], dtype=torch.int32),
    }
    got = SampledKDLoss()(StudentOutputs(logits), batch).total
    lq = torch.log_softmax(logits, -1)[0]
    want = (-(2 / 3 * lq[0, 1] + 1 / 3 * lq[0, 3]) - lq[1, 5]) / 2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_sampled_kd_is_unbiased_for_the_teacher_cross_entropy(scheme):
    """Mean of the estimator over N independent positions vs CE(p, q): |diff| < 5 standard
    errors (SE estimated from the per-position values, floored for systematic draws, whose
    spread can be tiny); gradients within 6 multinomial SE too."""
    N, n_draws, vocab = 6000, 8, 50
    g = torch.Generator().manual_seed(1)
    teacher_logits = 1.5 * torch.randn(vocab, generator=g, dtype=torch.float64)
    student_logits = torch.randn(vocab, generator=g, dtype=torch.float64)
    ids, counts = extract.sampled_draws(teacher_logits.float().expand(1, N, vocab), n_draws, 1.0, g, scheme)
    batch = {"valid": torch.ones(1, N, dtype=torch.bool), "draw_ids": ids.int(), "draw_counts": counts.int()}
    x = student_logits.clone().requires_grad_(True)
    total = SampledKDLoss()(StudentOutputs(x.expand(1, N, vocab)), batch).total
    total.backward()
    p, lq = torch.softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    ce = -(p * lq).sum()
    per_position = -((counts.double() / n_draws) * lq[ids.long()]).sum(-1)[0]
    se = per_position.std().item() / math.sqrt(N) + 1e-4
    assert abs(total.item() - ce.item()) < 5 * se
    grad_se = math.sqrt(p.max().item() / (N * n_draws))
    torch.testing.assert_close(x.grad, torch.softmax(student_logits, -1) - p, atol=6 * grad_se, rtol=0)


def test_sampled_store_temperature_must_match():
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, sampled=SampledSpec(n_draws=4, temperature=1.0))
    build_loss({"name": "sampled_kd"}, spec)
    with pytest.raises(ValueError, match="capture temperature"):
        build_loss({"name": "sampled_kd", "temperature": 2.0}, spec)


# ---------------------------------------------------------------- hard-label CE


def test_cross_entropy_uses_next_token_and_masks_padding():
    _, student, batch = make_case(k=3, invalid_tail=2)
    got = CrossEntropyLoss()(StudentOutputs(student), batch).total
    terms = []
    for b in range(B):
        for t in range(T - 1):
            if batch["valid"][b, t] and batch["valid"][b, t + 1]:
                terms.append(-torch.log_softmax(student[b, t], -1)[batch["input_ids"][b, t + 1]])
    assert len(terms) == (T - 1) + (T - 3)
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-12, rtol=0)
