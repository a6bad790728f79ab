"""Hidden-state and attention alignment, layer/head maps, and the feature-alignment composite.

Manual references are plain loops / einsum-free formulas; tolerance atol 1e-6 (float32).
"""

from __future__ import annotations

import pytest
import torch
from loss_batches import valid_mask

from kdstore.spec import AttentionSpec, HiddenSpec, StoreSpec, TopKSpec
from pipeline.train.losses import (
    LossConfigError,
    MissingLossFieldError,
    StudentDims,
    StudentOutputs,
    build_loss,
)
from pipeline.train.losses.alignment import AttentionLoss, HiddenLoss, resolve_layer_map

B, T, V, L_S, D_T = 2, 6, 40, 4, 12


def spec(width: int = D_T, hidden=(0, 2, 4, 6, 8), attn=(1, 3, 5, 7), heads=(0, 2, 3), attn_topk=None) -> StoreSpec:
    return StoreSpec(
        vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4, logp_step=0),
        hidden=HiddenSpec(layers=hidden, width=width) if hidden else None,
        attention=AttentionSpec(layers=attn, heads=heads, topk=attn_topk) if attn else None,
    )


def causal(g: torch.Generator, *lead: int) -> torch.Tensor:
    scores = torch.randn(*lead, T, T, generator=g)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1)


def make_batch(g: torch.Generator, hidden=(0, 2, 4, 6, 8), attn=(1, 3, 5, 7), h_sel=3, width=D_T) -> dict:
    batch = {"sample_id": torch.tensor([0, 1]), "valid": valid_mask(B, T, 2, row=0), "input_ids": torch.randint(0, V, (B, T), generator=g)}
    for layer in hidden:
        batch[f"hidden_{layer}"] = torch.randn(B, T, width, generator=g)
    for layer in attn:
        batch[f"attn_{layer}"] = causal(g, B, h_sel)
    return batch


def student_out(g: torch.Generator, width: int, heads: int = 4) -> StudentOutputs:
    hidden = tuple(torch.randn(B, T, width, generator=g, requires_grad=True) for _ in range(L_S + 1))
    attentions = tuple(causal(g, B, heads).requires_grad_(True) for _ in range(L_S))
    return StudentOutputs(torch.randn(B, T, V, generator=g), hidden, attentions)


# ---------------------------------------------------------------- layer maps


def test_layer_maps_resolve_as_documented():
    assert resolve_layer_map("uniform", [0, 4, 8, 12], 6, "hidden") == [(0, 0), (2, 4), (4, 8), (6, 12)]
    assert resolve_layer_map("uniform", [12, 4, 8], 6, "hidden") == [(2, 4), (4, 8), (6, 12)]
    assert resolve_layer_map("last", [0, 4, 8, 12], 6, "hidden") == [(6, 12)]
    assert resolve_layer_map("uniform", [3, 7, 11], 6, "attn") == [(1, 3), (3, 7), (5, 11)]
    assert resolve_layer_map("last", [3, 7, 11], 6, "attn") == [(5, 11)]
    assert resolve_layer_map("uniform", [1, 2, 3, 4, 5, 6, 7, 8], 2, "hidden") == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8)]
    assert resolve_layer_map([[1, 8], [2, 4]], [4, 8], 6, "hidden") == [(1, 8), (2, 4)]
    with pytest.raises(LossConfigError, match="out of range"):
        resolve_layer_map([[7, 8]], [8], 6, "hidden")
    with pytest.raises(LossConfigError, match="out of range"):
        resolve_layer_map([[6, 7]], [7], 6, "attn")


def test_explicit_teacher_layer_must_be_stored():
    with pytest.raises(MissingLossFieldError, match=r"loss 'hidden' needs store field\(s\) \['hidden_5'\]"):
        build_loss({"name": "hidden", "layer_map": [[1, 5]]}, spec(), StudentDims(L_S, D_T))
    with pytest.raises(MissingLossFieldError, match=r"'attention' needs store field\(s\) \['attn_2'\]"):
        build_loss({"name": "attention", "layer_map": [[1, 2]]}, spec(), StudentDims(L_S, D_T, 4))
    with pytest.raises(MissingLossFieldError, match="hidden_<layer>"):
        build_loss({"name": "hidden"}, spec(hidden=()), StudentDims(L_S, D_T))


def test_alignment_needs_student_dims():
    with pytest.raises(LossConfigError, match="StudentDims"):
        build_loss({"name": "hidden"}, spec())


# ---------------------------------------------------------------- hidden states


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_loss_matches_manual(metric):
    g = torch.Generator().manual_seed(0)
    batch, student = make_batch(g), student_out(g, D_T)
    loss = build_loss({"name": "hidden", "metric": metric, "layer_map": "uniform"}, spec(), StudentDims(L_S, D_T))
    assert isinstance(loss, HiddenLoss) and loss.projections is None
    assert loss.pairs == ((0, 0), (1, 2), (2, 4), (3, 6), (4, 8))
    got = loss(student, batch)
    per_pair = []
    for s, t in loss.pairs:
        terms = []
        for b in range(B):
            for pos in range(T):
                if batch["valid"][b, pos]:
                    hs, ht = student.hidden_states[s][b, pos], batch[f"hidden_{t}"][b, pos]
                    if metric == "mse":
                        terms.append(((hs - ht) ** 2).mean())
                    else:
                        terms.append(1 - hs.dot(ht) / (hs.norm() * ht.norm()))
        per_pair.append(torch.stack(terms).mean())
    torch.testing.assert_close(got.total, torch.stack(per_pair).mean(), atol=1e-6, rtol=1e-6)
    assert set(got.components) == {f"hidden_{metric}"}
    assert loss.fields == ("hidden_0", "hidden_2", "hidden_4", "hidden_6", "hidden_8", "valid")


def test_hidden_projection_created_when_widths_differ_and_learns():
    g = torch.Generator().manual_seed(1)
    d_s = 8
    batch, student = make_batch(g), student_out(g, d_s)
    loss = build_loss({"name": "hidden", "layer_map": "last"}, spec(), StudentDims(L_S, d_s))
    assert loss.pairs == ((L_S, 8),)
    assert loss.projections is not None and loss.projections[0].weight.shape == (D_T, d_s)
    params = list(loss.parameters())
    assert len(params) == 2
    loss(student, batch).total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert student.hidden_states[L_S].grad.abs().sum() > 0
    with torch.no_grad():  # the projection is applied before the MSE
        proj = loss.projections[0](student.hidden_states[L_S])
        want = ((proj - batch["hidden_8"]) ** 2).mean(-1)[batch["valid"]].mean()
    torch.testing.assert_close(loss(student, batch).total, want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- attention


def manual_attention(p_rows, q_rows, metric):
    """Per row: renormalised teacher; KL with 0 log 0 = 0 or squared error summed over keys."""
    p_rows = p_rows / p_rows.sum(-1, keepdim=True)
    if metric == "kl":
        return torch.where(p_rows > 0, p_rows * (p_rows.clamp_min(1e-30).log() - q_rows.clamp_min(1e-10).log()), 0).sum(-1)
    return ((p_rows - q_rows) ** 2).sum(-1)


@pytest.mark.parametrize("metric", ["kl", "mse"])
@pytest.mark.parametrize("head_map", ["mean", [[0, 3], [2, 0]]])
def test_dense_attention_matches_manual(metric, head_map):
    g = torch.Generator().manual_seed(2)
    batch, student = make_batch(g), student_out(g, D_T)
    batch["attn_7"] = batch["attn_7"] * 1.01  # quantised rows do not sum to 1 exactly
    loss = build_loss({"name": "attention", "metric": metric, "head_map": head_map, "layer_map": [[1, 3], [3, 7]]}, spec(), StudentDims(L_S, D_T, 4))
    assert isinstance(loss, AttentionLoss)
    got = loss(student, batch)
    stored = [0, 2, 3]
    per_pair = []
    for s, t in [(1, 3), (3, 7)]:
        q, p = student.attentions[s], batch[f"attn_{t}"]
        if head_map == "mean":
            q, p = q.mean(1, keepdim=True), p.mean(1, keepdim=True)
        else:
            q = q[:, [sh for sh, _ in head_map]]
            p = p[:, [stored.index(th) for _, th in head_map]]
        rows = manual_attention(p, q, metric)  # [B,H',T]
        per_pair.append(rows.permute(0, 2, 1)[batch["valid"]].mean())
    torch.testing.assert_close(got.total, torch.stack(per_pair).mean(), atol=1e-6, rtol=1e-6)
    got.total.backward()
    assert student.attentions[1].grad.abs().sum() > 0


def test_head_map_teacher_head_must_be_stored():
    with pytest.raises(LossConfigError, match=r"teacher head\(s\) \[1\] are not stored; stored heads: \[0, 2, 3\]"):
        build_loss({"name": "attention", "head_map": [[0, 1]]}, spec(), StudentDims(L_S, D_T, 4))


def topk_rows(p: torch.Tensor, ka: int) -> dict[str, torch.Tensor]:
    vals, ids = p.topk(ka, dim=-1)
    return {"_ids": ids.int(), "_p": vals}


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_topk_attention_with_all_keys_equals_dense(metric):
    g = torch.Generator().manual_seed(3)
    batch, student = make_batch(g, attn=(3,)), student_out(g, D_T)
    dense = build_loss({"name": "attention", "metric": metric, "head_map": [[1, 0], [2, 3]]}, spec(attn=(3,)), StudentDims(L_S, D_T, 4))
    sparse_spec = spec(attn=(3,), attn_topk=T)
    sparse = build_loss({"name": "attention", "metric": metric, "head_map": [[1, 0], [2, 3]]}, sparse_spec, StudentDims(L_S, D_T, 4))
    assert sparse.fields == ("attn_3_ids", "attn_3_p", "valid")
    rows = topk_rows(batch["attn_3"], T)
    sparse_batch = {**batch, "attn_3_ids": rows["_ids"], "attn_3_p": rows["_p"]}
    torch.testing.assert_close(sparse(student, sparse_batch).total, dense(student, batch).total, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_topk_attention_compares_kept_keys_plus_tail(metric):
    g = torch.Generator().manual_seed(4)
    ka = 2
    batch, student = make_batch(g, attn=(5,)), student_out(g, D_T)
    rows = topk_rows(batch["attn_5"], ka)
    batch = {**batch, "attn_5_ids": rows["_ids"], "attn_5_p": rows["_p"]}
    loss = build_loss({"name": "attention", "metric": metric, "head_map": [[0, 2]], "layer_map": [[2, 5]]}, spec(attn=(5,), attn_topk=ka), StudentDims(L_S, D_T, 4))
    got = loss(student, batch).total
    terms = []
    for b in range(B):
        for row in range(T):
            if not batch["valid"][b, row]:
                continue
            ids = rows["_ids"][b, 1, row].long()  # teacher head 2 is the second stored head
            kept = rows["_p"][b, 1, row]
            p = torch.cat([kept, (1 - kept.sum()).clamp_min(0)[None]])
            q_all = student.attentions[2][b, 0, row]
            q = torch.cat([q_all[ids], (q_all.sum() - q_all[ids].sum())[None]])
            terms.append(manual_attention(p, q, metric))
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)


def test_topk_attention_mean_head_map_runs_and_is_finite():
    g = torch.Generator().manual_seed(5)
    batch, student = make_batch(g, attn=(1, 3)), student_out(g, D_T)
    for layer in (1, 3):
        rows = topk_rows(batch.pop(f"attn_{layer}"), 3)
        batch[f"attn_{layer}_ids"], batch[f"attn_{layer}_p"] = rows["_ids"], rows["_p"]
    loss = build_loss({"name": "attention"}, spec(attn=(1, 3), attn_topk=3), StudentDims(L_S, D_T, 4))
    total = loss(student, batch).total
    total.backward()
    assert torch.isfinite(total) and total > 0
    assert all(torch.isfinite(a.grad).all() for a in student.attentions if a.grad is not None)


def test_alignment_all_padding_is_zero_with_finite_grads():
    g = torch.Generator().manual_seed(6)
    batch, student = make_batch(g), student_out(g, 8)
    batch["valid"] = torch.zeros(B, T, dtype=torch.bool)
    for cfg in ({"name": "hidden", "metric": "cosine"}, {"name": "hidden"}, {"name": "attention"}, {"name": "attention", "metric": "mse"}):
        loss = build_loss(cfg, spec(), StudentDims(L_S, 8, 4))
        total = loss(student, batch).total
        total.backward()
        assert total.item() == 0.0
        assert all(torch.isfinite(h.grad).all() for h in student.hidden_states if h.grad is not None)


# ---------------------------------------------------------------- feature-alignment KD


def test_fakd_is_the_weighted_sum_of_its_parts():
    g = torch.Generator().manual_seed(7)
    batch, student = make_batch(g), student_out(g, D_T)
    logp, ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(4, dim=-1)
    batch.update(topk_ids=ids.int(), topk_logp=logp, topk_tail=1 - logp.exp().sum(-1))
    cfg = {
        "name": "fakd",
        "output": {"name": "fkl", "weight": 1.0},
        "hidden": {"metric": "cosine", "weight": 0.5},
        "attention": {"metric": "kl", "weight": 0.25, "head_map": "mean"},
    }
    dims = StudentDims(L_S, D_T, 4)
    fakd = build_loss(cfg, spec(), dims)
    result = fakd(student, batch)
    assert set(result.components) == {"fkl", "hidden_cosine", "attn_kl"}
    parts = {c["name"]: build_loss(c, spec(), dims)(student, batch).total for c in ({"name": "fkl"}, {"name": "hidden", "metric": "cosine"}, {"name": "attention"})}
    want = parts["fkl"] + 0.5 * parts["hidden"] + 0.25 * parts["attention"]
    torch.testing.assert_close(result.total, want)
    assert fakd.needs == {"logits", "hidden_states", "attentions"}
    no_attn = build_loss({**cfg, "attention": None}, spec(attn=()), dims)
    assert "attn_kl" not in no_attn(student, batch).components
