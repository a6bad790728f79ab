"""The `self-distill` Prefect flow (real ephemeral server): two born-again rounds as sub-flows,
through the CLI, on the tiny random teacher; the plain-function path is tested in
tests/pipeline/test_self_distill.py."""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml

from flows.cli import main
from kdstore.reader import StoreReader
from pipeline.teacher import weights_digest


@pytest.mark.slow
def test_self_distill_flow_runs_the_rounds(tmp_path, tiny_teacher_dir, capsys):
    rng = random.Random(1)
    words = "the cat sat on a mat while python code ran fast near old stone bridges".split()
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(30)))
    out = tmp_path / "run"
    config = {
        "out": str(out), "rounds": 2, "eval_tokens": 128,
        "cache": {"teacher": {"name": str(tiny_teacher_dir), "batch_size": 4},
                  "corpus": {"kind": "files", "paths": [str(corpus)], "text_split": "blank_line", "val_fraction": 0.3},
                  "row_length": 32, "shard_rows": 8, "split": "train", "signals": {"topk": {"k": 8}}},
        "train": {"student": {"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 1},
                  "batch_size": 2, "steps": 1, "warmup_steps": 0, "device": "cpu", "tensorboard": False},
    }
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["self-distill", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | student1 | student2 |" in printed
    rounds = json.loads((out / "self_distill.json").read_text())["rounds"]
    assert [r["student"] for r in rounds] == ["student1", "student2"]
    assert all(math.isfinite(r["ppl"]) for r in rounds)
    prov = StoreReader(out / "round1" / "store").meta.provenance.teacher
    assert prov["weights_sha256"] == weights_digest(out / "round0" / "student1" / "model")
