"""`kdcache demo` end to end at a tiny size, with the real offline teacher; a second run reuses the cache."""

from __future__ import annotations

import json

import pytest

from flows.cli import main


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(tmp_path, capsys, default_teacher_dir):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--tokens", "1024", "--steps", "2"]) == 0
    first = capsys.readouterr().out
    assert "shards computed" in first and "clean" in first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["tokens"] >= 1024 and summary["student"]["steps"] == 2
    assert (out / "README.md").read_text().startswith("# kdcache demo")
    assert (out / "student_kd" / "model" / "config.json").is_file()
    assert main(["demo", "--out", str(out), "--tokens", "1024", "--steps", "2"]) == 0
    second = capsys.readouterr().out
    assert "no teacher work done" in second and "student reused" in second
