"""`parallel: fsdp`: FSDP2 (fully_shard) students under torchrun, 2 CPU ranks with gloo.

One torchrun launch runs, in each rank: a straight run of 4 steps (run a), then run b stopped
after 2 steps with a checkpoint, then run b resumed from it to step 4 by a new Trainer. The
resumed run must equal the straight one bitwise (losses, model, optimizer state), and the
student's parameters must really be sharded (each rank holds about half).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from pipeline.train.checkpoint import CHECKPOINT

REPO = Path(__file__).resolve().parents[3]

_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from pipeline.train.trainer import Trainer, TrainConfig
cfg, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
a = Trainer(TrainConfig(**{{**cfg, "out": out + "/a"}}))
params = list(a.student.model.parameters())
report = {{"rank": a.rank, "kinds": sorted({{type(p).__name__ for p in params}}),
          "local": sum(p.to_local().numel() for p in params), "full": sum(p.numel() for p in params)}}
a.train(progress=False)
b = Trainer(TrainConfig(**{{**cfg, "out": out + "/b"}}))
batches = b.batches()
for _ in range(2):
    b.train_step(batches)
b.save_checkpoint()
c = Trainer(TrainConfig(**{{**cfg, "out": out + "/b"}}))
report["resumed_at"] = c.step
c.train(progress=False)
open(out + f"/rank{{a.rank}}.json", "w").write(json.dumps(report))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> str:
    root = tmp_path_factory.mktemp("fsdp_store")
    return str(cache_short_docs(root / "store", tiny_teacher_dir, write_short_docs(root), split="all"))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_two_cpu_ranks_resume_bitwise(store, tiny_teacher_dir, tmp_path):
    cfg = {"store": store, "out": "unused", "parallel": "fsdp", "device": "cpu", "tensorboard": False,
           "student": {"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 2},
           "losses": [{"name": "fkl"}, {"name": "ce", "weight": 0.5}], "batch_size": 2, "steps": 4,
           "lr": 1e-3, "warmup_steps": 1, "clip": 1.0, "checkpoint_every": 100}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "run.py").write_text(_SCRIPT.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "run.py"), str(tmp_path / "cfg.json"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["kinds"] == ["DTensor"] and r["resumed_at"] == 2
        assert r["local"] < 0.6 * r["full"]  # each rank holds about half the student
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [e["step"] for e in log_a] == [1, 2, 3, 4] and [e["step"] for e in log_b] == [3, 4]
    assert [e["loss"] for e in log_b] == [e["loss"] for e in log_a[2:]]  # bitwise: same floats
    assert [e["sample_ids"] for e in log_b] == [e["sample_ids"] for e in log_a[2:]]
    a = torch.load(tmp_path / "a" / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][name][k]), (name, k)
    first = json.loads((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] > 0
    assert (tmp_path / "a" / "model" / "config.json").is_file()  # gathered and saved by rank 0



def test_fsdp_refuses_what_it_cannot_shard(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.config import ConfigError
    from pipeline.train.fsdp import shard_student

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)

    class HeadLoss(torch.nn.Module):
        needs = ("logits", "output_head")

    class ProjectedLoss(torch.nn.Module):
        needs = ("hidden_states",)

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="output head"):
        shard_student(model, HeadLoss())
    with pytest.raises(ConfigError, match="parameters of their own"):
        shard_student(model, ProjectedLoss())
    with pytest.raises(ConfigError, match="no decoder layer class"):
        shard_student(torch.nn.Linear(2, 2), torch.nn.Module())
