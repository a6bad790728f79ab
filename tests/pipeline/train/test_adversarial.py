"""Adversarial distillation: the discriminator module on its own (it learns; the output feature;
the R1 penalty), configs and field checks, then the trainer on a tiny store: optimizers kept
apart, finite logs, bitwise resume including the discriminator, a diverged discriminator, DDP.

The store: the tiny random teacher (width 64, 2 layers) over ~10 rows of 32 tokens, top-8 +
hidden_2. The trained student is a random width-32 Llama, so `feature: hidden` owns a projection.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdstore.reader import StoreReader
from kdstore.spec import HiddenSpec, SampledSpec, StoreSpec, TopKSpec
from kdstore.torch_stream import KDStream
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config
from pipeline.train.losses import (
    LossConfigError,
    MissingLossFieldError,
    NonFiniteLossError,
    StudentDims,
    StudentOutputs,
    auxiliary_losses,
    build_loss,
)
from pipeline.train.losses.adversarial import AdversarialLoss
from pipeline.train.trainer import CHECKPOINT, TrainConfig, Trainer, train

REPO = Path(__file__).resolve().parents[3]
WORDS = ("the cat sat on a mat while python code ran fast and students learned from "
         "teachers quietly near old stone bridges under grey skies").split()
B, T, V, D = 2, 6, 40, 8
SPEC = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4, logp_step=0),
                 hidden=HiddenSpec(layers=(1, 2), width=D))
STUDENT = {"init": "config", "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}}
ADV = {"name": "adversarial", "weight": 0.1, "hidden_dims": [32], "disc_lr": 1e-3}


def _batch(g: torch.Generator) -> dict:
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, -2:] = False
    logp, ids = torch.log_softmax(2 * torch.randn(B, T, V, generator=g), -1).topk(4, dim=-1)
    return {"sample_id": torch.tensor([3, 7]), "valid": valid, "input_ids": torch.randint(0, V, (B, T), generator=g),
            "hidden_1": torch.randn(B, T, D, generator=g), "hidden_2": torch.randn(B, T, D, generator=g) + 0.5,
            "topk_ids": ids.int(), "topk_logp": logp, "topk_tail": 1 - logp.exp().sum(-1)}


def _disc_params(loss) -> list[torch.nn.Parameter]:
    return [p for a in auxiliary_losses(loss) for p in a.discriminators.parameters()]


# ---------------------------------------------------------------- the module


def test_discriminator_learns_teacher_from_random_features():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    loss = build_loss({**ADV, "disc_lr": 1e-2, "hidden_dims": [16]}, SPEC, StudentDims(2, D))
    assert isinstance(loss.losses[0], AdversarialLoss) and loss.needs == {"hidden_states"}
    batch = _batch(g)
    student = StudentOutputs(torch.zeros(B, T, V), tuple(torch.randn(B, T, D, generator=g) for _ in range(3)))
    adv = auxiliary_losses(loss)[0]
    g_before = float(loss(student, batch).components["adv_g"])
    accs = [float(adv.auxiliary_step(student, batch)["disc_acc"]) for _ in range(40)]
    assert accs[0] <= 0.6 and accs[-1] > 0.95  # from chance to telling them apart
    assert float(loss(student, batch).components["adv_g"]) > g_before  # the student now fools it less
    assert adv.disc_scheduler.last_epoch == 40  # one update per step (disc_steps_per_step 1)


def test_projection_and_discriminator_have_separate_optimizers():
    loss = build_loss(ADV, SPEC, StudentDims(2, 12))  # width 12 → 8: a projection on the student side
    adv = loss.losses[0]
    student_side = {id(p) for p in loss.parameters()}
    disc = {id(p) for p in _disc_params(loss)}
    assert adv.projections is not None and student_side and disc and not student_side & disc
    assert {id(p) for grp in adv.disc_optimizer.param_groups for p in grp["params"]} == disc
    assert not any("discriminator" in k for k in loss.state_dict())


def test_output_feature_and_gradient_penalty():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = _batch(g)
    loss = build_loss({**ADV, "feature": "output", "gradient_penalty": 1.0, "disc_steps_per_step": 3}, SPEC)
    assert loss.fields == ("topk_ids", "topk_logp", "topk_tail", "valid") and loss.needs == {"logits"}
    assert auxiliary_losses(loss)[0].discriminators[0].layers[0].in_features == 5  # k + tail
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    stats = auxiliary_losses(loss)[0].auxiliary_step(StudentOutputs(logits), batch)
    assert math.isfinite(float(stats["adv_d"])) and auxiliary_losses(loss)[0].disc_scheduler.last_epoch == 3
    assert logits.grad is None  # the discriminator's step never reaches the student
    result = loss(StudentOutputs(logits), batch)
    result.total.backward()
    assert math.isfinite(float(result.components["adv_g"])) and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in _disc_params(loss))  # nor the student's backward the discriminator


def test_configs_and_field_checks():
    with pytest.raises(LossConfigError, match="layer_map applies to feature: hidden only"):
        build_loss({"name": "adversarial", "feature": "output", "layer_map": "last"}, SPEC)
    with pytest.raises(LossConfigError, match="unknown key 'adversarial.disc_rate'"):
        build_loss({"name": "adversarial", "disc_rate": 1e-3}, SPEC)
    no_hidden = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, topk=TopKSpec(k=4))
    with pytest.raises(MissingLossFieldError, match=r"loss 'adversarial' needs store field\(s\) \['hidden_<layer>'\]"):
        build_loss([{"name": "fkl"}, {"name": "adversarial", "feature": "hidden"}], no_hidden, StudentDims(2, D))
    with pytest.raises(MissingLossFieldError, match=r"loss 'adversarial' needs store field\(s\) \['hidden_3'\]"):
        build_loss({"name": "adversarial", "layer_map": [[1, 3]]}, SPEC, StudentDims(2, D))
    sampled = StoreSpec(vocab_size=V, row_length=T, shard_rows=2, sampled=SampledSpec(n_draws=4))
    with pytest.raises(MissingLossFieldError, match=r"'adversarial' needs store field\(s\) \['topk_ids', 'topk_logp', 'topk_tail'\]"):
        build_loss({"name": "adversarial", "feature": "output"}, sampled)
    assert build_loss({"name": "adversarial"}, SPEC, StudentDims(2, D)).pairs == ((2, 2),)  # last vs last


# ---------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("adversarial_store")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(2):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)) + ".")
    cfg = parse_config({
        "store": str(root / "store"), "teacher": {"name": str(tiny_teacher_dir), "batch_size": 4},
        "corpus": {"kind": "files", "paths": [str(corpus)]}, "row_length": 32, "shard_rows": 4,
        "split": "all", "signals": {"topk": {"k": 8}, "hidden": {"layers": [2]}},
    }, CacheConfig)
    run_cache(cfg, progress=None)
    return root / "store"


def _cfg(store: Path, out: Path, teacher: Path, **over) -> dict:
    data = {"store": str(store), "out": str(out), "student": {**STUDENT, "teacher": str(teacher)},
            "losses": [{"name": "fkl"}, ADV], "batch_size": 2, "steps": 4, "lr": 1e-3, "warmup_steps": 2,
            "checkpoint_every": 100, "device": "cpu", "tensorboard": False}
    data.update(over)
    return data


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)


def _assert_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers: bitwise equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_trains_with_fkl_logging_finite_adversarial_components(store, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**_cfg(store, out, tiny_teacher_dir)))
    disc = _disc_params(trainer.loss)
    student_opt = {id(p) for grp in trainer.optimizer.param_groups for p in grp["params"]}
    disc_opt = {id(p) for grp in trainer.aux_losses[0].disc_optimizer.param_groups for p in grp["params"]}
    assert disc_opt == {id(p) for p in disc} and not student_opt & disc_opt
    assert {id(p) for p in trainer.loss.parameters()} <= student_opt  # the projection is the student's
    before = [p.detach().clone() for p in disc]
    trainer.train(progress=False)
    log = _log(out)
    assert len(log) == 4
    for entry in log:
        assert all(math.isfinite(entry[k]) for k in ("fkl", "adv_g", "adv_d", "disc_acc", "loss"))
        assert 0 <= entry["disc_acc"] <= 1
        assert math.isclose(entry["loss"], entry["fkl"] + 0.1 * entry["adv_g"], rel_tol=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(before, disc, strict=True))
    aux = _checkpoint(out)["aux"]
    assert len(aux) == 1 and {"discriminators", "optimizer", "scheduler"} == aux[0].keys()
    assert aux[0]["scheduler"]["last_epoch"] == 4


def test_resume_is_bitwise_exact_including_the_discriminator(store, tiny_teacher_dir, tmp_path):
    losses = [{"name": "fkl"}, {**ADV, "disc_steps_per_step": 2, "disc_warmup_steps": 3},
              {**ADV, "feature": "output", "gradient_penalty": 0.5}]
    cfg_a = _cfg(store, tmp_path / "a", tiny_teacher_dir, losses=losses)
    train(cfg_a, progress=False)
    cfg_b = _cfg(store, tmp_path / "b", tiny_teacher_dir, losses=losses)
    first = Trainer(TrainConfig(**cfg_b))
    batches = first.batches()
    for _ in range(2):
        first.train_step(batches)
    first.save_checkpoint()
    del first, batches
    train(cfg_b, progress=False)  # resumes at step 2
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [e["step"] for e in log_b] == [3, 4]
    for key in ("loss", "adv_g", "adv_d", "disc_acc", "adv_g#2", "adv_d#2", "disc_acc#2", "sample_ids"):
        assert [e[key] for e in log_b] == [e[key] for e in log_a[2:]], key
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    for key in ("model", "loss", "optimizer", "aux"):
        _assert_equal(a[key], b[key], key)
    assert len(a["aux"]) == 2 and a["aux"][0]["scheduler"]["last_epoch"] == 8  # 2 updates × 4 steps
    state = _checkpoint(tmp_path / "b")
    state["aux"] = state["aux"][:1]
    torch.save(state, tmp_path / "b" / CHECKPOINT)
    with pytest.raises(ValueError, match=r"holds 1 auxiliary loss state\(s\) \(discriminators\), this run's losses have 2"):
        Trainer(TrainConfig(**cfg_b))


def test_diverged_discriminator_stops_naming_it(store, tiny_teacher_dir, tmp_path):
    trainer = Trainer(TrainConfig(**_cfg(store, tmp_path / "run", tiny_teacher_dir)))
    with torch.no_grad():
        trainer.aux_losses[0].discriminators[0].layers[0].weight[0, 0] = float("nan")
    student = [p.detach().clone() for p in trainer.student.model.parameters()]
    stream = KDStream(StoreReader(str(store)), ["valid"], 2, seed=0, buffer_rows=256, rank=0, world_size=1)
    ids = next(iter(stream))["sample_id"].tolist()
    with pytest.raises(NonFiniteLossError, match=rf"step 1: adversarial discriminator diverged .*adv_d=nan.*sample ids \[{ids[0]}, {ids[1]}\]"):
        trainer.train(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student, trainer.student.model.parameters(), strict=True))


# ---------------------------------------------------------------- DDP

_DDP_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {repo!r})
from pipeline.train import trainer
t = trainer.Trainer(trainer.TrainConfig(**json.loads(open(sys.argv[1]).read())))
t.train(progress=False)
def digest(params):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
report = {{"model": digest(t.student.model.parameters()), "disc": digest(t.aux_losses[0].discriminators.parameters())}}
open(sys.argv[2] + f"/rank{{t.rank}}.json", "w").write(json.dumps(report))
"""


@pytest.mark.slow
def test_ddp_keeps_the_discriminators_in_sync(store, tiny_teacher_dir, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_cfg(store, tmp_path / "run", tiny_teacher_dir, steps=2)))
    (tmp_path / "ddp.py").write_text(_DDP_SCRIPT.format(repo=str(REPO)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(tmp_path / "ddp.py"), str(tmp_path / "cfg.json"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]  # ranks saw different rows; averaged gradients kept both in sync
