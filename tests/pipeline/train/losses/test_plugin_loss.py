"""A loss registered from outside the package: the example of docs/guides/add-a-loss.md (the
squared Hellinger distance), taken from the page itself, checked against a dense float64
reference, refused typos, and trained through `kdcache train` as a `loss_modules` plugin."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from loss_batches import V, coarsen, make_case, value_and_grad

from kdstore.spec import StoreSpec, TopKSpec
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config
from pipeline.train.losses import (
    LOSSES,
    LossConfig,
    LossConfigError,
    StudentOutputs,
    UnknownLossError,
    build_loss,
    import_loss_modules,
    register_loss,
)
from pipeline.train.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[4]
GUIDE = REPO / "docs" / "guides" / "add-a-loss.md"


@pytest.fixture
def plugin(tmp_path):
    """The guide's example as a file; the registry as it was once the test is done."""
    saved = dict(LOSSES)
    path = tmp_path / "hellinger.py"
    path.write_text(re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1))
    yield path
    LOSSES.clear()
    LOSSES.update(saved)
    for name in [m for m in sys.modules if m.startswith("kdcache_loss_plugin_")]:
        del sys.modules[name]


def _hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)


@pytest.mark.parametrize("k", [V, 7])
def test_the_guide_example_matches_a_dense_float64_reference(plugin, k):
    import_loss_modules([str(plugin)])
    spec = LOSSES["hellinger"]
    assert spec.reads == "topk_ids, topk_logp, topk_tail, valid" and spec.config.__name__ == "HellingerConfig"
    assert spec.config.model_fields["temperature"].description
    teacher, student, batch = make_case(k=k, seed=k)
    loss = build_loss({"name": "hellinger"}, StoreSpec(vocab_size=V, row_length=5, shard_rows=2,
                                                       topk=TopKSpec(k=k, logp_step=0)))

    def reference(x: torch.Tensor) -> torch.Tensor:
        p, q = teacher.exp(), torch.softmax(x, -1)
        if k < V:  # over the kept ids + one tail bucket
            live = torch.isfinite(batch["topk_logp"])
            p, q = coarsen(p, batch["topk_ids"], live), coarsen(q, batch["topk_ids"], live)
        return _hellinger(p, q)[batch["valid"]].mean()

    got, got_grad = value_and_grad(lambda x: loss(StudentOutputs(x), batch).total, student)
    want, want_grad = value_and_grad(reference, student)
    assert want > 0
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-9, rtol=0)
    assert list(loss(StudentOutputs(student), batch).components) == ["hellinger"]


def test_config_errors_name_the_plugin_loss_and_the_key(plugin):
    base = {"store": "s", "out": "o", "loss_modules": [str(plugin)]}
    cfg = parse_config({**base, "losses": [{"name": "ce"}, {"name": "hellinger", "weight": 0.5}]}, TrainConfig)
    assert [type(c).__name__ for c in cfg.losses] == ["CEConfig", "HellingerConfig"]
    with pytest.raises(LossConfigError, match=r"^train.yaml: losses\[0\]: unknown key 'hellinger.temprature'$"):
        parse_config({**base, "losses": [{"name": "hellinger", "temprature": 2.0}]}, TrainConfig, "train.yaml")
    with pytest.raises(UnknownLossError, match=r"losses\[0\]: unknown loss 'helinger'; known losses: .*hellinger"):
        parse_config({**base, "losses": [{"name": "helinger"}]}, TrainConfig)
    with pytest.raises(LossConfigError, match=r"loss_modules\[0\]: cannot import loss module 'no_such_losses'"):
        parse_config({**base, "loss_modules": ["no_such_losses"], "losses": [{"name": "ce"}]}, TrainConfig)


def test_a_name_is_registered_once(plugin):
    from typing import Literal

    class Clash(LossConfig):
        name: Literal["fkl"]

    with pytest.raises(LossConfigError, match=r"loss 'fkl' is registered twice: by pipeline.train.losses.output"):
        register_loss("fkl", config=Clash, summary="a second fkl", fields=("valid",))(lambda cfg, store, student: None)
    with pytest.raises(LossConfigError, match="must be a Literal holding 'other'"):
        register_loss("other", config=Clash, summary="?", fields=("valid",))


@pytest.mark.slow
def test_the_plugin_trains_through_kdcache_train(plugin, tmp_path, tiny_teacher_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat while students learned from teachers near old stone bridges".split()
    (corpus / "doc.txt").write_text(" ".join(rng.choice(words) for _ in range(200)) + ".")
    run_cache(parse_config({
        "store": str(tmp_path / "store"), "teacher": {"name": str(tiny_teacher_dir), "batch_size": 4},
        "corpus": {"kind": "files", "paths": [str(corpus)]}, "row_length": 32, "shard_rows": 4, "split": "all",
        "signals": {"topk": {"k": 8}},
    }, CacheConfig), progress=None)
    config = {
        "store": str(tmp_path / "store"), "out": str(tmp_path / "run"),
        "student": {"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 1},
        "loss_modules": ["hellinger.py"],  # relative to the working directory
        "losses": [{"name": "hellinger"}, {"name": "ce", "weight": 0.1}],
        "batch_size": 2, "steps": 3, "warmup_steps": 1, "log_every": 1, "device": "cpu", "tensorboard": False,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--no-flow", "train.yaml"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    for entry in log:
        assert 0 < entry["hellinger"] < 1 and math.isclose(entry["loss"], entry["hellinger"] + 0.1 * entry["ce"],
                                                           rel_tol=1e-5)

    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**config, "losses": [{"name": "hellinger", "tau": 1}]}))
    typo = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--no-flow", "train.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == ["kdcache train: error: train.yaml: losses[0]: unknown key 'hellinger.tau'"]
