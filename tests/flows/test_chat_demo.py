"""`kdcache demo --chat`'s flow end to end at a tiny size (tiny random teacher, synthetic
conversations): the chat store, two students with response-only losses, the chat evaluation and
the report. The real run (SmolLM2 over ShareGPT) is `kdcache demo --chat`."""

from __future__ import annotations

import json
import math

import pytest

from flows.chat_demo import chat_demo_flow
from tests.chat_docs import write_chat_corpus


@pytest.mark.slow
def test_chat_demo_flow_tiny(tmp_path, tiny_teacher_dir, capsys):
    corpus = write_chat_corpus(tmp_path)
    out = tmp_path / "chat_demo"
    result = chat_demo_flow(str(out), tokens=1024, steps=2, eval_tokens=512, teacher=str(tiny_teacher_dir),
                            paths=[str(corpus)], train_overrides={"student.layers": [1], "batch_size": 1})
    printed = capsys.readouterr().out
    assert "of them the assistant's" not in printed and "are the assistant's (the loss mask)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["spec"]["loss_mask"] is True
    assert 0 < summary["conversations"]["loss_tokens"] < summary["conversations"]["valid_tokens"]
    for name in ("teacher", "kd", "ce"):
        assert math.isfinite(result["ppl"][name]) and result["ppl"][name] > 1
    assert {"vs_reference", "vs_teacher"} <= set(summary["eval"]["kd"]["generation"])
    report = (out / "README.md").read_text()
    assert report.startswith("# kdcache chat demo") and "assistant's tokens only" in report and "| kd |" in report
