"""`multi_teacher` (per_teacher and mixture) against dense float64 references.

The references are written independently of the implementation: dense softmaxes, the mixture
mixed densely, coarsened by hand (per teacher: its kept ids + tail; mixture: ids kept by every
teacher + one rest bucket), textbook divergences. atol 1e-9 in float64, values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from loss_batches import reference, topk_signals, valid_mask

from kdstore.spec import StoreSpec, TopKSpec
from pipeline.train.losses import (
    LossConfigError,
    MissingLossFieldError,
    StoreInfo,
    StudentOutputs,
    build_loss,
    check_fields,
)
from pipeline.train.losses.multi import MultiTeacherLoss

NAMES = ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]
B, T, V = 2, 6, 64


def make_case(ks, top_ps=None, seed=0, invalid_tail=2):
    """Correlated teachers (shared base + own noise, so their top-k overlap in part), their top-k
    batch (teacher i ≥ 1 under `t<i>/`), and student logits. Returns (dense log-probs, logits, batch)."""
    g = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    student = 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    batch = {"sample_id": torch.tensor([3, 4]), "valid": valid_mask(B, T, invalid_tail),
             "input_ids": torch.randint(0, V, (B, T), generator=g)}
    teachers = []
    for i, k in enumerate(ks):
        teacher = torch.log_softmax(base + 0.8 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
        top_p = (top_ps or [None] * len(ks))[i]
        batch.update(topk_signals(teacher, k, top_p=top_p, prefix="" if i == 0 else f"t{i}/"))
        teachers.append(teacher)
    return teachers, student, batch


def kept_mask(batch, i):
    prefix = "" if i == 0 else f"t{i}/"
    ids, logp = batch[prefix + "topk_ids"].long(), batch[prefix + "topk_logp"]
    return torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, ids, torch.isfinite(logp))


def coarsen(p, keep):
    """[.., V] probabilities → [.., V+1]: p at kept ids (0 elsewhere), then the mass of the others.
    Zero buckets on both sides add nothing to any divergence below."""
    return torch.cat([torch.where(keep, p, 0.0), torch.where(keep, 0.0, p).sum(-1, keepdim=True)], -1)


def masked(per, batch):
    return per[batch["valid"]].mean()


def ref_per_teacher(name, teachers, logits, batch, weights, coarse):
    q = torch.softmax(logits, -1)
    total = 0.0
    for i, (w, teacher) in enumerate(zip(weights, teachers, strict=True)):
        p = teacher.exp()
        keep = kept_mask(batch, i) if coarse else torch.ones(B, T, V, dtype=torch.bool)
        total = total + w * masked(reference(name, coarsen(p, keep), coarsen(q, keep)), batch)
    return total


def ref_mixture(name, teachers, logits, batch, weights, coarse):
    q = torch.softmax(logits, -1)
    p = sum(w * t.exp() for w, t in zip(weights, teachers, strict=True)) / sum(weights)
    shared = torch.ones(B, T, V, dtype=torch.bool)
    if coarse:
        for i in range(len(teachers)):
            shared &= kept_mask(batch, i)
    return masked(reference(name, coarsen(p, shared), coarsen(q, shared)), batch)


def value_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def check_both_modes(name, teachers, student, batch, weights, coarse):
    for mode, ref in (("per_teacher", ref_per_teacher), ("mixture", ref_mixture)):
        loss = MultiTeacherLoss(mode, name, None, weights)
        got, got_grad = value_and_grad(lambda x, loss=loss: loss(StudentOutputs(x), batch).total, student)
        want, want_grad = value_and_grad(lambda x, ref=ref: ref(name, teachers, x, batch, weights, coarse), student)
        assert got.item() > 0, mode
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0, msg=mode)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-9, rtol=0, msg=mode)


@pytest.mark.parametrize("name", NAMES)
def test_k_equals_vocab_is_the_dense_loss(name):
    teachers, student, batch = make_case([V, V])
    check_both_modes(name, teachers, student, batch, [0.3, 0.7], coarse=False)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ks,top_ps", [([7, 5], None), ([9, 6, 12], [None, 0.7, None])])
def test_k_below_vocab_matches_the_coarsened_reference(name, ks, top_ps):
    teachers, student, batch = make_case(ks, top_ps, seed=len(ks))
    shared = kept_mask(batch, 0)
    for i in range(1, len(ks)):
        shared &= kept_mask(batch, i)
    sizes = shared.sum(-1)[batch["valid"]]
    kept0 = kept_mask(batch, 0).sum(-1)[batch["valid"]]
    assert sizes.max() >= 2 and (sizes < kept0).any()  # a real partial overlap
    weights = [1.0, 2.0, 0.5][: len(ks)]
    check_both_modes(name, teachers, student, batch, weights, coarse=True)


def test_no_shared_id_leaves_one_bucket_and_zero_loss():
    """Disjoint kept sets: the only exact bucket is 'everything', whose mass is 1 for both."""
    teachers, student, batch = make_case([3, 3], invalid_tail=0)
    batch["t1/topk_ids"] = (batch["topk_ids"] + 3 + batch["topk_ids"].max()) % V  # disjoint from teacher 0's
    shared = kept_mask(batch, 0) & kept_mask(batch, 1)
    assert not shared.any()
    assert MultiTeacherLoss("mixture", "fkl", None, [1, 1])(StudentOutputs(student), batch).total.item() == 0.0


def test_mixture_weights_are_normalised():
    teachers, student, batch = make_case([8, 8])
    a = MultiTeacherLoss("mixture", "js", None, [2.0, 6.0])(StudentOutputs(student), batch).total
    b = MultiTeacherLoss("mixture", "js", None, [0.25, 0.75])(StudentOutputs(student), batch).total
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["per_teacher", "mixture"])
@pytest.mark.parametrize("garbage", [False, True])
def test_all_padding_batch_gives_exact_zero(mode, garbage):
    _, student, batch = make_case([7, 5], [0.6, None])
    batch["valid"] = torch.zeros(B, T, dtype=torch.bool)
    if garbage:
        for prefix in ("", "t1/"):
            batch[prefix + "topk_logp"] = torch.full_like(batch[prefix + "topk_logp"], float("-inf"))
            batch[prefix + "topk_tail"] = torch.full_like(batch[prefix + "topk_tail"], float("nan"))
    for name in NAMES:
        x = student.float().clone().requires_grad_(True)
        total = MultiTeacherLoss(mode, name, None, [0.5, 0.5])(StudentOutputs(x), batch).total
        total.backward()
        assert total.item() == 0.0 and (x.grad == 0).all(), name


def test_components_are_named_per_teacher_or_mix():
    _, student, batch = make_case([7, 5])
    per = MultiTeacherLoss("per_teacher", "rkl", None, [0.5, 2.0])(StudentOutputs(student), batch)
    assert set(per.components) == {"rkl_t0", "rkl_t1"}
    torch.testing.assert_close(per.total, 0.5 * per.components["rkl_t0"] + 2.0 * per.components["rkl_t1"])
    mix = MultiTeacherLoss("mixture", "rkl", None, [0.5, 2.0])(StudentOutputs(student), batch)
    assert set(mix.components) == {"rkl_mix"}


# ---------------------------------------------------------------- config, fields, registry


def _info(teachers: int, temperatures=None) -> StoreInfo:
    temps = temperatures or [1.0] * teachers
    specs = [StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=8, temperature=t)) for t in temps]
    names = ["sample_id", "input_ids", "valid", "topk_ids", "topk_logp", "topk_tail"]
    joined = [n for i in range(teachers) for n in (names if i == 0 else [f"t{i}/{x}" for x in names])]
    return StoreInfo(specs[0], tuple(joined), teacher_specs=tuple(specs[1:]))


def test_build_from_config_and_check_fields():
    info = _info(2)
    loss = build_loss({"name": "multi_teacher", "mode": "mixture", "divergence": "skl", "divergence_param": 0.2}, info)
    assert loss.weights == (0.5, 0.5) and loss.mode == "mixture"  # default: equal weights over every store
    assert loss.fields == ("topk_ids", "topk_logp", "topk_tail", "t1/topk_ids", "t1/topk_logp", "t1/topk_tail", "valid")
    check_fields([{"name": "multi_teacher", "weights": [1, 1]}], info.field_names)
    with pytest.raises(MissingLossFieldError, match=r"loss 'multi_teacher' needs store field\(s\) \['t1/topk_tail'\]"):
        check_fields([{"name": "multi_teacher"}], [n for n in info.field_names if n != "t1/topk_tail"])


def test_bad_configs_are_refused_with_clear_errors():
    with pytest.raises(LossConfigError, match=r"3 weights \(teachers 0..2\) but only 2 store\(s\) are joined"):
        build_loss({"name": "multi_teacher", "weights": [1, 1, 1]}, _info(2))
    with pytest.raises(LossConfigError, match=r"multi_teacher.mode"):
        build_loss({"name": "multi_teacher", "mode": "average"}, _info(2))
    with pytest.raises(LossConfigError, match=r"divergence_param does not apply to 'fkl'"):
        build_loss({"name": "multi_teacher", "divergence_param": 0.3}, _info(2))
    with pytest.raises(LossConfigError, match=r"weights.1.*greater than 0"):
        build_loss({"name": "multi_teacher", "weights": [1, 0]}, _info(2))


def test_each_teacher_is_retempered_from_its_own_capture_temperature():
    info = _info(2, temperatures=[1.0, 2.0])
    with pytest.raises(LossConfigError, match=r"multi_teacher \(teacher 1\).*capture temperature 2.0"):
        build_loss({"name": "multi_teacher"}, info)
    loss = build_loss({"name": "multi_teacher", "retemper": True, "temperature": 2.0}, info)
    assert loss.teacher_powers == (0.5, 1.0)
