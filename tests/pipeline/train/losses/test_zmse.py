"""Hidden alignment in the teacher's standardised space (`hidden` metric zmse, fakd's default):
dense float64 reference, scale against outlier dimensions, statistics recorded by the teacher pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_batches import valid_mask

from kdstore.reader import StoreReader
from kdstore.spec import HiddenSpec, StoreSpec, TopKSpec
from pipeline.train.losses import (
    LossConfigError,
    StoreInfo,
    StudentDims,
    StudentOutputs,
    build_loss,
)

B, T, D_S, D_T, L_S = 2, 5, 6, 8, 2


def _info(std: torch.Tensor, layers=(2,)) -> StoreInfo:
    spec = StoreSpec(vocab_size=10, row_length=T, shard_rows=2, topk=TopKSpec(k=2),
                     hidden=HiddenSpec(layers=layers, width=D_T))
    from kdstore.fields import fields_for_spec

    return StoreInfo(spec, tuple(f.name for f in fields_for_spec(spec)),
                     hidden_stats_loader=lambda: {L: (torch.zeros(D_T), std) for L in layers})


def test_zmse_matches_a_dense_float64_reference():
    g = torch.Generator().manual_seed(0)
    std = torch.rand(D_T, generator=g, dtype=torch.float64) * 5 + 0.1
    loss = build_loss({"name": "hidden", "metric": "zmse"}, _info(std.float()), StudentDims(L_S, D_S))
    hidden = tuple(torch.randn(B, T, D_S, generator=g, requires_grad=True) for _ in range(L_S + 1))
    valid = valid_mask(B, T, T - 3)
    batch = {"hidden_2": torch.randn(B, T, D_T, generator=g), "valid": valid}
    value = loss(StudentOutputs(torch.zeros(B, T, 10), hidden), batch).total
    proj = loss.projections[0]
    h64 = hidden[L_S].detach().double().requires_grad_()
    h = h64 @ proj.weight.T.double() + proj.bias.double()
    ref = (((h - batch["hidden_2"].double()) / std.float().double()) ** 2).mean(-1)[valid].mean()
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)  # float32 loss vs float64 reference
    g1 = torch.autograd.grad(value, hidden[L_S])[0]
    g2 = torch.autograd.grad(ref, h64)[0]
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-6)


def test_outlier_dimensions_do_not_own_the_loss():
    """Teacher features of std 1 except two of std 300 (the offline teacher's outliers): a student
    that predicts the mean scores ~1 in zmse, ~11,000 in raw MSE."""
    g = torch.Generator().manual_seed(1)
    scale = torch.ones(D_T)
    scale[:2] = 300.0
    ht = torch.randn(64, T, D_T, generator=g) * scale
    std = ht.reshape(-1, D_T).std(0, correction=0)
    mean = ht.reshape(-1, D_T).mean(0)
    dims = StudentDims(L_S, D_T)
    batch = {"hidden_2": ht, "valid": torch.ones(64, T, dtype=torch.bool)}
    student = StudentOutputs(torch.zeros(64, T, 10), tuple(mean.expand(64, T, D_T).clone() for _ in range(L_S + 1)))
    z = build_loss({"name": "hidden", "metric": "zmse"}, _info(std), dims)(student, batch).total
    raw = build_loss({"name": "hidden"}, _info(std), dims)(student, batch).total
    assert abs(float(z) - 1.0) < 1e-4
    assert float(raw) > 10_000


def test_zmse_needs_statistics_and_a_constant_feature_is_floored():
    spec = StoreSpec(vocab_size=10, row_length=T, shard_rows=2, topk=TopKSpec(k=2), hidden=HiddenSpec(layers=(2,), width=D_T))
    with pytest.raises(LossConfigError, match="hidden-state statistics"):
        build_loss({"name": "hidden", "metric": "zmse"}, spec, StudentDims(L_S, D_T))
    std = torch.ones(D_T)
    std[0] = 0.0
    loss = build_loss({"name": "hidden", "metric": "zmse"}, _info(std), StudentDims(L_S, D_T))
    assert torch.isfinite(loss.inv_std).all() and float(loss.inv_std.max()) == pytest.approx(1e3)
    with pytest.raises(LossConfigError, match=r"shape \(3,\)"):
        build_loss({"name": "hidden", "metric": "zmse"}, _info(torch.ones(3)), StudentDims(L_S, D_T))


def test_teacher_pass_records_hidden_statistics(tmp_path, tiny_teacher_dir):
    from pipeline.capture.pass_setup import teacher_for
    from pipeline.capture.shard_plan import plan_shards
    from pipeline.capture.teacher_pass import run_cache
    from pipeline.config import CacheConfig, parse_config

    cfg = parse_config({"store": str(tmp_path / "store"), "teacher": {"name": str(tiny_teacher_dir), "batch_size": 4},
                        "corpus": {"kind": "builtin", "max_documents": 2}, "row_length": 32, "shard_rows": 8,
                        "split": "train", "max_tokens": 512,
                        "signals": {"topk": {"k": 4}, "hidden": {"layers": [1, 2]}}}, CacheConfig)
    run_cache(cfg, progress=None)
    reader = StoreReader(cfg.store)
    teacher = teacher_for(cfg)
    rows = plan_shards(cfg, teacher.tokenizer)[0].rows
    with torch.no_grad():
        out = teacher.model(torch.from_numpy(rows.input_ids[:16].astype(np.int64)), output_hidden_states=True)
    stats = StoreInfo.of(reader).teacher_hidden_stats("test")
    for layer in (1, 2):
        h = out.hidden_states[layer].double()[torch.from_numpy(rows.valid[:16].astype(bool))]
        torch.testing.assert_close(stats[layer][0].double(), h.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats[layer][1].double(), h.std(0, correction=0), rtol=1e-4, atol=1e-5)
    loss = build_loss({"name": "fakd", "attention": None}, reader, StudentDims(2, 64))
    assert "hidden_zmse" in loss(StudentOutputs(torch.randn(1, 32, reader.spec.vocab_size),
                                                tuple(torch.randn(1, 32, 64) for _ in range(3))),
                                 _first_batch(reader, loss.fields)).components
    # a store without the file (older stores): the first shard's statistics stand in
    (tmp_path / "store" / "teacher" / "hidden_stats.safetensors").unlink()
    fallback = StoreInfo.of(StoreReader(cfg.store)).teacher_hidden_stats("test")
    first = reader.read_shard(reader.shard_ids()[0], ["hidden_2", "valid"])
    h = torch.from_numpy(first["hidden_2"][:16][first["valid"][:16].astype(bool)]).double()
    torch.testing.assert_close(fallback[2][1].double(), h.std(0, correction=0), rtol=1e-5, atol=1e-6)


def _first_batch(reader: StoreReader, fields) -> dict:
    rows = reader.read_shard(reader.shard_ids()[0], list(fields))
    return {k: torch.from_numpy(np.asarray(v[:1])) for k, v in rows.items()}
