"""The trainer's fused path (last hidden state + head, no whole logits) against its unfused path:
same losses, same gradients on every student parameter, same first step; and which configs fuse.

A tiny store (tiny random teacher, rows of 32, top-8 + 4 sampled draws) built once for the module.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import _cfg, _corpus, _make_store

from pipeline.train.losses import StudentOutputs
from pipeline.train.trainer import TrainConfig, Trainer

LOSSES = [{"name": "fkl"}, {"name": "ce", "weight": 0.5}, {"name": "sampled_kd", "weight": 0.25},
          {"name": "tvd", "weight": 0.1}]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("fused_store")
    return _make_store(root / "store", tiny_teacher_dir, _corpus(root / "corpus"),
                       {"topk": {"k": 8}, "sampled": {"n_draws": 4}})


def _trainer(store, tmp_path, teacher, name="run", **over):
    return Trainer(TrainConfig(**_cfg(store, tmp_path / name, teacher, losses=LOSSES, **over)))


def test_fused_and_unfused_give_the_same_losses_and_gradients(store, tiny_teacher_dir, tmp_path):
    t = _trainer(store, tmp_path, tiny_teacher_dir)
    assert t.fused
    model = t.student.model
    batch = next(t.batches())
    head = model.get_output_embeddings().weight

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        if fused:
            student = StudentOutputs(None, output_head=head, last_hidden=t.forward_model(batch["input_ids"]))
        else:
            student = StudentOutputs(model(input_ids=batch["input_ids"], use_cache=False).logits, output_head=head)
        result = t.loss(student, batch)
        result.total.backward()
        return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = run(True)
    want, want_grads = run(False)
    assert list(got.components) == list(want.components) == ["fkl", "ce", "sampled_kd", "tvd"]
    for key in want.components:
        torch.testing.assert_close(got.components[key], want.components[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 3
    for name, grad in want_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert ((got_grads[name] - grad).abs().max() / scale).item() < 1e-4, name


def test_first_step_is_the_same_fused_or_not(store, tiny_teacher_dir, tmp_path):
    plain_trainer = _trainer(store, tmp_path, tiny_teacher_dir, "plain", steps=1, fused_loss=False)
    assert not plain_trainer.fused
    a_trainer = _trainer(store, tmp_path, tiny_teacher_dir, "fused2", steps=1)
    a = a_trainer.train_step(a_trainer.batches())
    b = plain_trainer.train_step(plain_trainer.batches())
    assert a["sample_ids"] == b["sample_ids"]
    for key in ("fkl", "ce", "sampled_kd", "tvd", "loss"):
        assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), key


@pytest.mark.parametrize("losses,fuses", [
    ([{"name": "ce"}], True),
    ([{"name": "mix", "losses": [{"name": "akl"}, {"name": "ce"}]}], True),
    ([{"name": "fkl"}, {"name": "adversarial", "feature": "output", "weight": 0.1}], False),  # own optimizer
])
def test_which_configs_fuse(store, tiny_teacher_dir, tmp_path, losses, fuses):
    t = Trainer(TrainConfig(**_cfg(store, tmp_path / "x", tiny_teacher_dir, losses=losses)))
    assert t.fused is fuses
    assert isinstance(t.train_step(t.batches())["loss"], float)
