"""The hybrid sparsifier (`topk_tail_sample` + `hybrid_kd`): unbiased against the dense forward
KL, exact at k = V, rotation of stored draws over epochs, extraction and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_batches import topk_batch

from kdstore.errors import SpecError
from kdstore.fields import fields_for_spec
from kdstore.reader import StoreReader
from kdstore.spec import Provenance, StoreSpec, TailSampleSpec, TopKSpec, fingerprint
from kdstore.writer import StoreWriter
from pipeline.capture.extract import tail_draws, topk_logprobs
from pipeline.config import ConfigError, SignalsConfig
from pipeline.train.losses import LossConfigError, MissingLossFieldError, StudentOutputs, build_loss
from pipeline.train.losses.hybrid import TailDrawError

V, B, T = 40, 2, 5


def _spec(k: int, n_draws: int = 8) -> StoreSpec:
    return StoreSpec(vocab_size=V, row_length=T, shard_rows=4, topk=TopKSpec(k=k, logp_step=0.0),
                     tail_sample=TailSampleSpec(n_draws=n_draws))


def _teacher(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0


def _batch(teacher: torch.Tensor, k: int, n_draws: int, seed: int) -> dict[str, torch.Tensor]:
    batch = topk_batch(torch.log_softmax(teacher, -1), k, invalid_tail=1)  # float64: the reference is exact
    t_ids, t_counts = tail_draws(teacher, batch["topk_ids"].long(), batch["topk_logp"], n_draws, 1.0,
                                 torch.Generator().manual_seed(seed))
    return {**batch, "tail_ids": t_ids, "tail_counts": t_counts}


def _dense_fkl(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    per = (lp.exp() * (lp - lq)).sum(-1)
    return per[valid].mean()


def _tail_entropy_term(teacher: torch.Tensor, k: int, valid: torch.Tensor) -> torch.Tensor:
    """P_T · H(r): what E[hybrid] exceeds the dense KL by (r = the teacher's renormalised tail)."""
    p = torch.softmax(teacher, -1)
    ids = p.topk(k, -1).indices
    p_tail = p.scatter(-1, ids, 0.0)
    mass = p_tail.sum(-1, keepdim=True)
    r = p_tail / mass
    h = -(torch.where(r > 0, r * r.clamp_min(1e-300).log(), 0.0)).sum(-1)
    return (mass[..., 0] * h)[valid].mean()


def _gradient_se(teacher: torch.Tensor, k: int, n: int, seeds: int, valid: torch.Tensor) -> torch.Tensor:
    """The exact standard error of the mean gradient over `seeds` seeds: d loss / d z_j gets
    -P_T (c_j / n - s_j) / positions from the draws, c_j ~ Binomial(n, r_j), so its SE is
    P_T sqrt(r_j (1 - r_j) / (n · seeds)) / positions (0 at kept ids: the head is exact)."""
    p = torch.softmax(teacher, -1)
    p_tail = p.scatter(-1, p.topk(k, -1).indices, 0.0)
    mass = p_tail.sum(-1, keepdim=True)
    r = p_tail / mass
    se = mass * (r * (1 - r) / (n * seeds)).sqrt() / valid.sum()
    return torch.where(valid[..., None], se, 0.0)


def test_unbiased_against_the_dense_forward_kl():
    """Over 300 draw seeds the mean value (minus the known P_T·H(r)) and the mean gradient match
    the dense forward KL within 5 standard errors of the estimator (the value's SE measured over
    the seeds, the gradient's exact: `_gradient_se`)."""
    k, n, seeds = 4, 3, 300
    teacher = _teacher(1)
    student = (torch.randn(B, T, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).requires_grad_()
    loss = build_loss({"name": "hybrid_kd"}, _spec(k, n))
    values, grads = [], []
    for seed in range(seeds):
        batch = _batch(teacher, k, n, seed)
        value = loss(StudentOutputs(student), batch).total
        (grad,) = torch.autograd.grad(value, student)
        values.append(float(value.detach()))
        grads.append(grad)
    valid = batch["valid"]
    dense = _dense_fkl(teacher, student, valid)
    (dense_grad,) = torch.autograd.grad(dense, student)
    values_t, grads_t = torch.tensor(values, dtype=torch.float64), torch.stack(grads)
    se = values_t.std() / seeds**0.5
    assert se > 0  # the draws do vary the estimate
    offset = _tail_entropy_term(teacher, k, valid)
    assert abs(values_t.mean() - offset - dense.detach()) < 5 * se
    g_se = _gradient_se(teacher, k, n, seeds, valid)
    p = torch.softmax(teacher, -1)
    common = valid[..., None] & (p * n * seeds > 100 * p.scatter(-1, p.topk(k, -1).indices, 0.0).sum(-1, keepdim=True))
    common &= g_se > 0
    assert common.sum() > 10  # the stated SE is the one measured, where ids are drawn often enough to tell
    assert torch.allclose(grads_t.std(0)[common], (g_se * seeds**0.5)[common], rtol=0.3)
    assert torch.all((grads_t.mean(0) - dense_grad).abs() <= 5 * g_se + 1e-12)
    # the coarsened loss alone (no draws) fails the same bound: the test can tell a biased gradient
    coarse = build_loss({"name": "fkl"}, _spec(k, n))
    (coarse_grad,) = torch.autograd.grad(coarse(StudentOutputs(student), batch).total, student)
    assert not torch.all((coarse_grad - dense_grad).abs() <= 5 * g_se + 1e-12)


def test_exact_at_k_equal_v():
    teacher = _teacher(3)
    student = torch.randn(B, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    batch = _batch(teacher, V, 8, 0)
    assert int(batch["tail_counts"].sum()) == 0  # nothing left to sample
    value = build_loss({"name": "hybrid_kd"}, _spec(V))(StudentOutputs(student), batch).total
    dense = _dense_fkl(teacher, student, batch["valid"])
    assert torch.allclose(value, dense, rtol=0, atol=1e-10)
    g1, g2 = (torch.autograd.grad(x, student)[0] for x in (value, dense))
    assert torch.allclose(g1, g2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,stored,per_step", [(4, 8, None), (4, 12, 3), (V, 8, None)])
def test_fused_matches_unfused_values_and_gradients(k, stored, per_step):
    """The fused path (last hidden + head, no logits: one sparse CE where a position has draws,
    the coarsened KL where it has none) against the logits path, float64, atol 1e-10."""
    teacher = _teacher(11)
    batch = _batch(teacher, k, stored, 2)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    head = torch.randn(V, 6, generator=g, dtype=torch.float64)
    config = {"name": "hybrid_kd", **({"draws_per_step": per_step} if per_step else {})}
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        loss = build_loss(config, _spec(k, stored))
        out = StudentOutputs(None, output_head=w, last_hidden=h) if fused else StudentOutputs(h @ w.T)
        value = loss(out, {**batch, "epoch": torch.tensor(1)}).total
        results.append((value.detach(), *torch.autograd.grad(value, (h, w))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_rotation_uses_disjoint_windows_that_average_to_all_draws():
    """N = 4m stored draws, m per step: four epochs use each stored draw exactly once, so their
    mean equals the all-draws loss; the epoch counter survives the state dict."""
    k, m = 4, 3
    teacher, student = _teacher(5), torch.randn(B, T, V, dtype=torch.float64)
    batch = _batch(teacher, k, 4 * m, 7)
    full = build_loss({"name": "hybrid_kd"}, _spec(k, 4 * m))(StudentOutputs(student), batch).total
    rotating = build_loss({"name": "hybrid_kd", "draws_per_step": m}, _spec(k, 4 * m))
    per_epoch = [rotating(StudentOutputs(student), batch).total for _ in range(4)]
    assert len({round(float(v), 12) for v in per_epoch}) == 4  # each epoch a different target
    assert torch.allclose(torch.stack(per_epoch).mean(), full, rtol=0, atol=1e-12)
    resumed = build_loss({"name": "hybrid_kd", "draws_per_step": m}, _spec(k, 4 * m))
    state = rotating.state_dict()
    rotating2 = build_loss({"name": "hybrid_kd", "draws_per_step": m}, _spec(k, 4 * m))
    rotating2(StudentOutputs(student), batch)  # epoch 0 ...
    resumed.load_state_dict(rotating2.state_dict())
    assert torch.allclose(resumed(StudentOutputs(student), batch).total, per_epoch[1])  # ... then epoch 1
    assert state["_extra_state"]["visits"] == {0: 4, 1: 4}
    explicit = {**batch, "epoch": torch.tensor(2)}
    assert torch.allclose(rotating(StudentOutputs(student), explicit).total, per_epoch[2])


def test_tail_draws_follow_the_renormalised_tail():
    """Draws never hit kept ids (top-p padding slots stay in the tail), counts sum to n_draws and
    the empirical frequencies match p_i / P_T (chi-square-sized tolerance)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, V, generator=g) * 1.5
    ids, logp, _ = topk_logprobs(logits, 6, top_p=0.3)
    kept = ids[torch.isfinite(logp)]
    assert 0 < len(kept) < 6  # some top-p padding
    n = 255
    counts = torch.zeros(V)
    for seed in range(40):
        t_ids, t_counts = tail_draws(logits, ids, logp, n, 1.0, torch.Generator().manual_seed(seed))
        assert int(t_counts.sum()) == n
        counts.index_add_(0, t_ids[0, 0].long(), t_counts[0, 0].float())
    assert counts[kept].sum() == 0
    p = torch.softmax(logits[0, 0].double(), -1)
    p[kept] = 0
    r = p / p.sum()
    total = 40 * n
    se = (r * (1 - r) / total).sqrt()
    assert torch.all((counts.double() / total - r).abs() <= 5 * se + 1e-9)


def test_store_roundtrip_and_fingerprint(tmp_path):
    spec = _spec(4, 6)
    assert {"tail_ids", "tail_counts"} <= {f.name for f in fields_for_spec(spec)}
    assert StoreSpec.from_dict(spec.to_dict()) == spec
    plain = StoreSpec(vocab_size=V, row_length=T, shard_rows=4, topk=TopKSpec(k=4, logp_step=0.0))
    assert "tail_sample" not in plain.to_dict()  # older stores keep their fingerprints
    prov = Provenance()
    assert len({fingerprint(s, prov) for s in (plain, spec, _spec(4, 7))}) == 3
    batch = _batch(_teacher(9), 4, 6, 0)
    rows = {k: v.numpy() for k, v in batch.items()}
    rows.update(sample_id=np.arange(B), input_ids=np.zeros((B, T), np.int64), doc_ids=np.zeros((B, T), np.int32),
                topk_logp=rows["topk_logp"].astype(np.float32), topk_tail=rows["topk_tail"].astype(np.float32))
    writer = StoreWriter(str(tmp_path / "s"), spec, prov)
    writer.write_shard("a", rows)
    got = StoreReader(str(tmp_path / "s")).read_shard("a", ["tail_ids", "tail_counts"])
    assert np.array_equal(got["tail_counts"], rows["tail_counts"])
    assert np.array_equal(np.where(got["tail_counts"] > 0, got["tail_ids"], 0), rows["tail_ids"])


def test_bad_input_gets_a_named_error():
    with pytest.raises(SpecError, match="tail_sample.n_draws"):
        TailSampleSpec(n_draws=0)
    with pytest.raises(SpecError, match="tail_sample needs topk"):
        StoreSpec(vocab_size=V, row_length=T, shard_rows=4, tail_sample=TailSampleSpec(n_draws=2))
    with pytest.raises(Exception, match="n_draws"):
        SignalsConfig.model_validate({"tail_sample": {"n_draws": 0}})
    with pytest.raises(Exception, match="tail_sample needs signals.topk"):
        SignalsConfig.model_validate({"topk": None, "sampled": {}, "tail_sample": {}})
    plain = StoreSpec(vocab_size=V, row_length=T, shard_rows=4, topk=TopKSpec(k=4))
    with pytest.raises(MissingLossFieldError, match="hybrid_kd.*tail_ids"):
        build_loss({"name": "hybrid_kd"}, plain)
    with pytest.raises(LossConfigError, match="draws_per_step 9 > the store's tail_sample.n_draws 8"):
        build_loss({"name": "hybrid_kd", "draws_per_step": 9}, _spec(4))
    with pytest.raises(LossConfigError, match="temperature 2.0 differs"):
        build_loss({"name": "hybrid_kd", "temperature": 2.0}, _spec(4))
    with pytest.raises(ConfigError, match="draws_per_step"):
        build_loss({"name": "hybrid_kd", "draws_per_step": 0}, _spec(4))
    loss = build_loss({"name": "hybrid_kd"}, _spec(4))
    batch = _batch(_teacher(0), 4, 8, 0)
    bad = batch["tail_ids"].clone()
    bad[1, 2, 0] = batch["topk_ids"][1, 2, 0]
    with pytest.raises(TailDrawError, match=r"tail draws on kept \(top-k\) ids at sample ids \[1\]"):
        loss(StudentOutputs(torch.randn(B, T, V)), {**batch, "tail_ids": bad})
    with pytest.raises(MissingLossFieldError, match="tail_counts"):
        loss(StudentOutputs(torch.randn(B, T, V)), {k: v for k, v in batch.items() if k != "tail_counts"})


def test_teacher_pass_writes_tail_draws(tmp_path, tiny_teacher_dir):
    """A real (tiny) teacher pass: store.json records tail_sample, and every token's tail draws
    avoid its kept ids and sum to n_draws."""
    from pipeline.capture.teacher_pass import run_cache
    from pipeline.config import CacheConfig, parse_config

    cfg = parse_config({"store": str(tmp_path / "store"), "teacher": {"name": str(tiny_teacher_dir), "batch_size": 4},
                        "corpus": {"kind": "builtin", "max_documents": 2}, "row_length": 32, "shard_rows": 8,
                        "split": "train", "max_tokens": 256,
                        "signals": {"topk": {"k": 16}, "tail_sample": {"n_draws": 8}}}, CacheConfig)
    run_cache(cfg, progress=None)
    reader = StoreReader(cfg.store)
    assert reader.spec.tail_sample == TailSampleSpec(n_draws=8)
    got = reader.read_shard(reader.shard_ids()[0], ["topk_ids", "tail_ids", "tail_counts"])
    assert np.all(got["tail_counts"].sum(-1) == 8)
    drawn = got["tail_counts"] > 0
    hits = (got["tail_ids"][..., :, None] == got["topk_ids"][..., None, :]).any(-1) & drawn
    assert not hits.any()
    loss = build_loss({"name": "hybrid_kd", "draws_per_step": 4}, reader)
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in reader.read_shard(reader.shard_ids()[0], list(loss.fields)).items()}
    batch["sample_id"] = torch.arange(len(batch["valid"]))
    value = loss(StudentOutputs(torch.randn(*batch["valid"].shape, reader.spec.vocab_size)), batch).total
    assert torch.isfinite(value)
