"""The `self-distill` Prefect flow (real ephemeral server): two born-again rounds as sub-flows,
through the CLI, on the tiny random teacher; the plain-function path is tested in
tests/pipeline/test_self_distill.py."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from short_docs import cache_section, write_short_docs

from flows.cli import main
from kdstore.reader import StoreReader
from pipeline.capture.teacher import weights_digest


@pytest.mark.slow
def test_self_distill_flow_runs_the_rounds(tmp_path, tiny_teacher_dir, capsys):
    out = tmp_path / "run"
    config = {
        "out": str(out), "rounds": 2, "eval_tokens": 128,
        "cache": cache_section(tiny_teacher_dir, write_short_docs(tmp_path)),
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
