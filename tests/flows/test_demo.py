"""`kdcache demo` end to end at a tiny size, with the real offline teacher: the cache, two
students (KD and CE-only), the evaluation and the report; a second run reuses the cache and the
students and says so."""

from __future__ import annotations

import json
import math

import pytest

from flows.cli import main

TINY = ["--tokens", "1024", "--steps", "2", "--eval-tokens", "512"]


@pytest.fixture
def short_generation(tmp_path, monkeypatch):
    """The demo's eval config with 2 prompts of 8 new tokens instead of 8 of 32: at this size,
    generating with the three models was over a third of the test's time; the same code runs."""
    import yaml

    import flows.demo

    data = yaml.safe_load(flows.demo.EVAL_CONFIG.read_text())
    data["generation"].update(prompts=2, new_tokens=8)
    path = tmp_path / "eval_demo.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(flows.demo, "EVAL_CONFIG", path)


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(tmp_path, capsys, default_teacher_dir, short_generation):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    first = capsys.readouterr().out
    assert "shards computed" in first and "[4/4] report" in first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["tokens"] >= 1024
    assert summary["students"]["kd"]["steps"] == 2 and summary["students"]["ce"]["steps"] == 2
    for name in ("teacher", "kd", "ce"):
        m = summary["eval"][name]
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1 and 0 <= m["ece"] <= 1, name
    assert summary["eval"]["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert summary["eval"]["kd"]["kl_to_teacher"] > 0
    report = (out / "README.md").read_text()
    assert report.startswith("# kdcache demo") and "| kd |" in report and "Δ ppl vs ce" in report
    for png in ("metrics.png", "reliability.png", "training_curves.png", "bytes_vs_k.png"):
        assert (out / png).stat().st_size > 5000, png
    assert (out / "student_kd" / "model" / "config.json").is_file()
    assert (out / "student_ce" / "model" / "config.json").is_file()
    assert main(["demo", "--out", str(out), *TINY]) == 0
    second = capsys.readouterr().out
    assert "no teacher work done" in second and "KD student reused" in second and "CE baseline reused" in second
