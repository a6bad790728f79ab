"""Registry, configs, field checks, weighted sums, NaN detection, and a real store end to end."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import yaml
from loss_batches import topk_batch

import pipeline.train.losses as losses_pkg
from kdstore.fields import fields_for_spec
from kdstore.reader import StoreReader
from kdstore.spec import AttentionSpec, HiddenSpec, Provenance, SampledSpec, StoreSpec, TopKSpec
from kdstore.torch_stream import KDStream
from kdstore.writer import StoreWriter
from pipeline.capture import extract
from pipeline.train.losses import (
    LOSSES,
    LossConfig,
    LossConfigError,
    LossResult,
    MissingLossFieldError,
    NonFiniteLossError,
    StudentDims,
    StudentOutputs,
    UnknownLossError,
    WeightedSum,
    build_loss,
    check_fields,
    check_finite,
    known_names,
    parse_loss_config,
    required_fields,
)

V, T = 40, 6
TOPK = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4, logp_step=0))
SAMPLED = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, sampled=SampledSpec(n_draws=4))
ALL_NAMES = ["adversarial", "akl", "attention", "ce", "dskd", "dskd_cma", "fakd", "fkl", "hidden", "hybrid_kd", "js", "mix", "multi_teacher",
             "rkl", "sampled_kd", "skl", "srkl", "tvd", "xtok_align"]


def test_registry_names():
    assert sorted(LOSSES) == known_names() == ALL_NAMES


def test_every_loss_is_documented_by_its_spec():
    """What the docs' loss reference reads: a one-line summary, the fields in words, and every
    config parameter with a description; the config's `name` admits the registry name."""
    for name, spec in LOSSES.items():
        assert spec.name == name and "\n" not in spec.summary and spec.summary and spec.reads
        assert issubclass(spec.config, LossConfig) and spec.config.model_config["extra"] == "forbid"
        assert all(info.description for info in spec.config.model_fields.values()), name
        assert parse_loss_config({"name": name, **REQUIRED.get(name, {})}).name == name
    assert LOSSES["fkl"].reads.startswith("topk_ids, topk_logp, topk_tail, valid")
    assert {n for n, s in LOSSES.items() if s.tokens == "student"} == {"xtok_align", "dskd_cma"}


REQUIRED = {"mix": {"losses": [{"name": "ce"}]}}


def test_constructor_defaults_are_the_config_defaults():
    """The dual-space modules take their settings from their config: built without one, they
    hold the config's defaults (the authors' recipe), as `build_loss` gives them."""
    from pipeline.train.losses.cross_tokenizer import CMAConfig, CrossModelAttentionKD
    from pipeline.train.losses.dskd import DSKDConfig, DualSpaceKD

    dskd = DualSpaceKD(torch.randn(V, 8), 8, 2)
    assert (dskd.t2s_correct_only, dskd.recipe.kd_rate, dskd.temperature) == (False, 0.5, 2.0)
    assert DSKDConfig().t2s_correct_only is False and DSKDConfig().kd_rate == 0.5
    cma = CrossModelAttentionKD(torch.randn(V, 8), torch.randn(V, 8), 8, 2)
    assert (cma.t2s_correct_only, cma.target_values, cma.recipe.kd_rate) == (True, True, 0.5)
    assert CMAConfig().target_values is True


@pytest.mark.parametrize("cfg", [{"name": "fkll"}, [{"name": "ce"}, {"name": "mix", "losses": [{"name": "kl"}]}]])
def test_unknown_name_lists_known_names(cfg):
    with pytest.raises(UnknownLossError) as info:
        build_loss(cfg, TOPK)
    message = str(info.value)
    assert "unknown loss" in message and ", ".join(ALL_NAMES) in message


def test_missing_field_names_the_loss_and_the_field():
    with pytest.raises(MissingLossFieldError, match=r"loss 'fkl' needs store field\(s\) \['topk_ids', 'topk_logp', 'topk_tail'\]"):
        build_loss([{"name": "ce"}, {"name": "fkl"}], SAMPLED)
    with pytest.raises(MissingLossFieldError, match=r"loss 'sampled_kd' needs store field\(s\) \['draw_ids', 'draw_counts'\]"):
        check_fields([{"name": "mix", "losses": [{"name": "sampled_kd"}]}], ["valid", "input_ids"])
    check_fields([{"name": "fkl"}, {"name": "ce"}], ["topk_ids", "topk_logp", "topk_tail", "valid", "input_ids"])


def test_config_errors_name_the_key():
    with pytest.raises(LossConfigError, match="unknown key 'fkl.temprature'"):
        parse_loss_config({"name": "fkl", "temprature": 2.0})
    with pytest.raises(LossConfigError, match="'alpha' applies to"):
        parse_loss_config({"name": "js", "alpha": 0.2})
    with pytest.raises(LossConfigError, match="weight"):
        parse_loss_config({"name": "ce", "weight": -1})
    with pytest.raises(LossConfigError, match="divergence_param does not apply"):
        parse_loss_config({"name": "dskd", "divergence": "fkl", "divergence_param": 0.3})
    assert parse_loss_config({"name": "skl"}).param() == 0.1
    assert parse_loss_config({"name": "srkl", "alpha": 0.3}).param() == 0.3
    assert parse_loss_config({"name": "akl"}).param() == 0.5


def test_temperature_must_match_capture_unless_retemper():
    with pytest.raises(LossConfigError, match="capture temperature 1.0; set retemper: true"):
        build_loss({"name": "fkl", "temperature": 2.0}, TOPK)
    assert build_loss({"name": "fkl", "temperature": 2.0, "retemper": True}, TOPK).teacher_power == 0.5


def make_batch(seed: int = 0) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(2, T, V, generator=g), -1)
    batch = topk_batch(teacher, 4, sample_ids=torch.tensor([5, 9]), input_ids=torch.randint(0, V, (2, T), generator=g))
    return batch, torch.randn(2, T, V, generator=g, requires_grad=True)


def test_weighted_sum_total_and_components():
    batch, logits = make_batch()
    loss = build_loss([{"name": "fkl", "weight": 0.7}, {"name": "ce", "weight": 0.3}, {"name": "fkl", "weight": 0.0}], TOPK)
    assert isinstance(loss, WeightedSum)
    assert loss.fields == ("topk_ids", "topk_logp", "topk_tail", "valid", "input_ids")
    assert loss.needs == {"logits"}
    result = loss(StudentOutputs(logits), batch)
    assert list(result.components) == ["fkl", "ce", "fkl#2"]
    c = result.components
    torch.testing.assert_close(result.total, 0.7 * c["fkl"] + 0.3 * c["ce"])
    assert all(not v.requires_grad for v in c.values())
    single = build_loss({"name": "rkl", "weight": 2.0}, TOPK)
    alone = build_loss({"name": "rkl"}, TOPK)
    torch.testing.assert_close(single(StudentOutputs(logits), batch).total, 2 * alone(StudentOutputs(logits), batch).total)


def test_required_fields_of_configs_and_modules_agree():
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4), hidden=HiddenSpec(layers=(2, 4), width=8))
    names = [f.name for f in fields_for_spec(spec)]
    cfg = [{"name": "fkl"}, {"name": "hidden", "layer_map": "last"}, {"name": "ce"}]
    from_cfg = required_fields(cfg, names)
    assert from_cfg == ("topk_ids", "topk_logp", "topk_tail", "valid", "hidden_4", "input_ids")
    assert set(required_fields(build_loss(cfg, spec, StudentDims(2, 8)), names)) == set(from_cfg)


def test_check_finite_names_component_and_sample_ids():
    batch, logits = make_batch()
    result = LossResult(torch.tensor(float("nan")), {"fkl": torch.tensor(1.0), "hidden_mse": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteLossError, match=r"hidden_mse=inf.*sample ids \[5, 9\]"):
        check_finite(result, batch)
    check_finite(build_loss({"name": "fkl"}, TOPK)(StudentOutputs(logits), batch), batch)


def test_yaml_example_from_the_package_docstring_builds():
    doc = losses_pkg.__doc__
    snippet = doc[doc.index("    losses:"):doc.index("Registry names")]
    cfg = yaml.safe_load(textwrap.dedent(snippet))["losses"]
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4), hidden=HiddenSpec(layers=(4, 8), width=8))
    loss = build_loss(cfg, spec, StudentDims(num_layers=4, hidden_size=6))
    assert [type(m).__name__ for m in loss.losses] == ["DistributionLoss", "CrossEntropyLoss", "HiddenLoss"]
    assert len(list(loss.parameters())) == 4  # two projections (6 → 8), weight + bias each


# ---------------------------------------------------------------- a real store, streamed


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> str:
    """Two rows written by StoreWriter from a random 'teacher' (float32 log-probs, fp16 hidden,
    uint16 attention, a teacher head and teacher.json), as the teacher pass would."""
    R, K, D, H, LAYERS = 4, 6, 8, 2, 2
    spec = StoreSpec(
        vocab_size=V, row_length=T, shard_rows=R,
        topk=TopKSpec(k=K, sampler="topp_k", top_p=0.9, logp_step=0),
        sampled=SampledSpec(n_draws=8),
        hidden=HiddenSpec(layers=(0, LAYERS), width=D),
        attention=AttentionSpec(layers=(1,), heads=(0, 1), dtype="uint16"),
    )
    path = str(tmp_path_factory.mktemp("losses") / "store")
    writer = StoreWriter(path, spec, Provenance(teacher={"name": "random"}))
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, D, generator=g)
    hidden = [torch.randn(R, T, D, generator=g) for _ in range(LAYERS + 1)]
    logits = hidden[-1] @ head.T
    ids, logp, tail = extract.topk_logprobs(logits, K, 1.0, 0.9)
    draw_ids, counts = extract.sampled_draws(logits, 8, 1.0, g)
    scores = torch.randn(R, H, T, T, generator=g).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    valid = np.ones((R, T), bool)
    valid[-1, -2:] = False
    rows = {
        "sample_id": np.arange(R), "input_ids": logits.argmax(-1).numpy(), "doc_ids": np.zeros((R, T), np.int32), "valid": valid,
        "topk_ids": ids.numpy(), "topk_logp": logp.numpy(), "topk_tail": tail.numpy(),
        "draw_ids": draw_ids.numpy(), "draw_counts": counts.numpy(),
        "hidden_0": hidden[0].numpy(), f"hidden_{LAYERS}": hidden[-1].numpy(),
        "attn_1": torch.softmax(scores, -1).numpy(),
    }
    writer.write_shard("s0", rows)
    writer.write_teacher_tensors("output_head", {"weight": head.numpy().astype("float16")})
    writer.write_teacher_file("teacher.json", json.dumps({"num_layers": LAYERS}).encode())
    return path


def test_every_loss_on_a_streamed_store_batch(tiny_store):
    reader = StoreReader(tiny_store)
    dims = StudentDims(num_layers=3, hidden_size=5, num_heads=4)
    cfg = [
        *({"name": n} for n in ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "sampled_kd", "ce"]),
        {"name": "fakd", "hidden": {"metric": "cosine"}},
        {"name": "dskd"},
        {"name": "attention", "head_map": [[3, 1]], "metric": "mse"},
    ]
    loss = build_loss(cfg, reader, dims)
    assert loss.needs == {"logits", "hidden_states", "attentions", "output_head"}
    batch = next(iter(KDStream(reader, loss.fields, batch_size=4, shuffle=False)))
    g = torch.Generator().manual_seed(1)
    hidden = tuple(torch.randn(4, T, 5, generator=g, requires_grad=True) for _ in range(4))
    head = torch.randn(V, 5, generator=g, requires_grad=True)
    attn = tuple(torch.softmax(torch.randn(4, 4, T, T, generator=g), -1).requires_grad_(True) for _ in range(3))
    student = StudentOutputs((hidden[-1] @ head.T).bfloat16(), hidden, attn, head)
    result = loss(student, batch)
    check_finite(result, batch)
    assert {"fkl", "sampled_kd", "ce", "hidden_cosine", "attn_kl", "fkl#2", "dskd_s2t", "dskd_t2s", "dskd_t2s_ce", "attn_mse"} <= set(result.components)
    result.total.backward()
    assert head.grad is not None and torch.isfinite(head.grad).all()
    assert all(p.grad is not None for p in loss.parameters())
