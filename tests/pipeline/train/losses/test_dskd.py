"""Dual-space KD from the cache: finiteness, gradients, the identity case, the t2s terms.

Tolerances: atol 1e-6 (float32) unless stated.
"""

from __future__ import annotations

import pytest
import torch
from loss_batches import topk_batch

from kdstore.spec import HiddenSpec, StoreSpec, TopKSpec
from pipeline.train.losses import (
    LossConfigError,
    MissingLossFieldError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    build_loss,
)
from pipeline.train.losses.dskd import DualSpaceKD
from pipeline.train.losses.output import DistributionLoss

B, T, V, D_S, D_T, K, LAYERS = 2, 6, 50, 8, 12, 5, 3


def store(d_t: int = D_T, head: torch.Tensor | None = None, layers=(1, LAYERS), num_layers: int | None = None) -> StoreInfo:
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=K, logp_step=0), hidden=HiddenSpec(layers=layers, width=d_t))
    info = StoreInfo.of(spec)
    w = head if head is not None else torch.randn(V, d_t, generator=torch.Generator().manual_seed(9))
    return StoreInfo(info.spec, info.field_names, lambda: w, num_layers)


def make(d_s: int = D_S, d_t: int = D_T, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher_logp = torch.log_softmax(2 * torch.randn(B, T, V, generator=g), -1)
    hidden_fields = {}
    input_ids = torch.randint(0, V, (B, T), generator=g)
    hidden_fields[f"hidden_{LAYERS}"] = torch.randn(B, T, d_t, generator=g)
    hidden_fields["hidden_1"] = torch.randn(B, T, d_t, generator=g)
    batch = topk_batch(teacher_logp, K, sample_ids=torch.tensor([3, 4]), input_ids=input_ids, invalid_tail=2,
                       **hidden_fields)
    head = torch.randn(V, d_s, generator=g, requires_grad=True)
    hidden = tuple(torch.randn(B, T, d_s, generator=g, requires_grad=True) for _ in range(3))
    logits = hidden[-1] @ head.T
    return batch, StudentOutputs(logits, hidden, None, head), head


def test_components_finite_and_projections_learn():
    batch, student, head = make()
    loss = build_loss({"name": "dskd"}, store(), StudentDims(2, D_S))
    assert isinstance(loss, DualSpaceKD) and loss.teacher_layer == LAYERS
    assert loss.fields == ("topk_ids", "topk_logp", "topk_tail", f"hidden_{LAYERS}", "input_ids", "valid")
    result = loss(student, batch)
    assert set(result.components) == {"dskd_s2t", "dskd_t2s", "dskd_t2s_ce", "dskd_ce"}
    assert all(torch.isfinite(v) for v in result.components.values())
    c = result.components  # the authors' recipe: (1 - kd_rate) CE + kd_rate (s2t + t2s + t2s_ce), kd_rate 0.5
    torch.testing.assert_close(result.total, 0.5 * c["dskd_ce"] + 0.5 * (c["dskd_s2t"] + c["dskd_t2s"] + c["dskd_t2s_ce"]))
    labels = batch["input_ids"][:, 1:]
    mask = batch["valid"][:, :-1] & batch["valid"][:, 1:]
    ce = torch.nn.functional.cross_entropy(student.logits[:, :-1][mask], labels[mask])
    torch.testing.assert_close(c["dskd_ce"], ce.detach())
    kd_only = build_loss({"name": "dskd", "kd_rate": None}, store(), StudentDims(2, D_S))(student, batch)
    torch.testing.assert_close(kd_only.total, sum(kd_only.components.values()))
    result.total.backward()
    named = dict(loss.named_parameters())
    assert set(named) == {"s2t.weight", "s2t.bias", "t2s.weight", "t2s.bias"}  # the teacher head is a buffer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    assert "teacher_head" not in loss.state_dict()
    assert student.hidden_states[-1].grad.abs().sum() > 0


def test_student_head_is_detached_in_the_t2s_branch():
    batch, student, head = make()
    loss = build_loss({"name": "dskd", "s2t_weight": 0, "t2s_weight": 0, "kd_rate": None}, store(), StudentDims(2, D_S))
    loss(student, batch).total.backward()  # only t2s CE: trains the projection, not the student head
    assert head.grad is None or (head.grad == 0).all()
    assert loss.t2s.weight.grad.abs().sum() > 0


def test_identity_setup_s2t_equals_plain_kd():
    """Same width, projection = identity, teacher head = student head → s2t KD == fkl on the student
    (at the recipe's τ = 2: the re-tempered cached teacher, power τc/τ = 0.5)."""
    batch, student, head = make(d_s=D_T, seed=1)
    w = head.detach().clone()
    loss = build_loss({"name": "dskd"}, store(head=w), StudentDims(2, D_T))
    with torch.no_grad():
        loss.s2t.weight.copy_(torch.eye(D_T))
        loss.s2t.bias.zero_()
    got = loss(student, batch).components["dskd_s2t"]
    want = DistributionLoss("fkl", temperature=2.0, teacher_power=0.5)(student, batch).total
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("correct_only", "tau"), [(True, 1.0), (False, 1.0), (False, 2.0)])
def test_t2s_terms_match_manual(correct_only, tau):
    """t2s CE at τ = 1; t2s KD between the student and the projected teacher, both at τ (the
    authors' code divides both logits by the KD temperature)."""
    batch, student, _ = make(seed=2)
    loss = build_loss({"name": "dskd", "divergence": "rkl", "t2s_correct_only": correct_only, "temperature": tau},
                      store(), StudentDims(2, D_S))
    z = (loss.t2s(batch[f"hidden_{LAYERS}"]) @ student.output_head.T).detach()
    right = torch.zeros(B, T - 1, dtype=torch.bool)
    right[:, ::2] = True  # the projected teacher predicts the label at even positions only
    labels = torch.where(right, z[:, :-1].argmax(-1), (z[:, :-1].argmax(-1) + 1) % V)
    batch["input_ids"] = torch.cat([batch["input_ids"][:, :1], labels], 1)
    result = loss(student, batch)
    ce_terms, kd_terms = [], []
    for b in range(B):
        for t in range(T - 1):
            if not (batch["valid"][b, t] and batch["valid"][b, t + 1]):
                continue
            ce_terms.append(-torch.log_softmax(z[b, t], -1)[labels[b, t]])
            lp, lq = torch.log_softmax(z[b, t] / tau, -1), torch.log_softmax(student.logits[b, t] / tau, -1)
            kd = (lq.exp() * (lq - lp)).sum()  # rkl(target, student) = KL(student ‖ target)
            kd_terms.append(kd if (right[b, t] or not correct_only) else kd * 0)
    torch.testing.assert_close(result.components["dskd_t2s_ce"], torch.stack(ce_terms).mean().detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.components["dskd_t2s"], torch.stack(kd_terms).mean().detach(), atol=1e-5, rtol=1e-5)


def test_projector_warmup_trains_only_the_projections():
    """For projector_warmup_steps training forwards the student gets only its CE (t2s KD off, s2t on
    detached hidden states); then the full loss; the count survives the state dict."""
    batch, student, head = make()
    cfg = {"name": "dskd", "projector_warmup_steps": 1, "kd_rate": None, "t2s_ce_weight": 0}
    loss = build_loss(cfg, store(), StudentDims(2, D_S))
    loss(student, batch).total.backward()
    grad = student.hidden_states[-1].grad
    assert (grad is None or not grad.any()) and loss.s2t.weight.grad.abs().sum() > 0
    assert loss.state_dict()["_extra_state"] == {"steps": 1}
    resumed = build_loss(cfg, store(), StudentDims(2, D_S))
    resumed.load_state_dict(loss.state_dict())
    batch, student, head = make()
    resumed(student, batch).total.backward()
    assert student.hidden_states[-1].grad.abs().sum() > 0


def test_dskd_all_padding_is_zero():
    batch, student, _ = make()
    batch["valid"] = torch.zeros(B, T, dtype=torch.bool)
    loss = build_loss({"name": "dskd"}, store(), StudentDims(2, D_S))
    total = loss(student, batch).total
    total.backward()
    assert total.item() == 0.0
    assert torch.isfinite(student.hidden_states[-1].grad).all()


def test_dskd_checks_store_and_teacher():
    with pytest.raises(MissingLossFieldError, match=r"loss 'dskd' needs store field\(s\) \['hidden_7'\]"):
        build_loss({"name": "dskd", "teacher_layer": 7}, store(), StudentDims(2, D_S))
    with pytest.raises(LossConfigError, match="last hidden states"):
        build_loss({"name": "dskd"}, store(num_layers=30), StudentDims(2, D_S))
    bare = StoreInfo.of(store().spec)
    with pytest.raises(LossConfigError, match="output head"):
        build_loss({"name": "dskd"}, bare, StudentDims(2, D_S))
    with pytest.raises(ValueError, match="output_head"):
        build_loss({"name": "dskd"}, store(), StudentDims(2, D_S))(StudentOutputs(torch.zeros(B, T, V), (torch.zeros(B, T, D_S),)), {})
