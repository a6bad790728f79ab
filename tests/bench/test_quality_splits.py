"""`python -m bench.quality`: sweep points are trained and scored on the validation split only,
so no choice of weight or recipe reads the test split. A tiny teacher over 40 short documents
(one blank-line block each, so each document is wholly validation, test or train)."""

from __future__ import annotations

import argparse

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from bench import quality
from bench.quality_methods import Preset
from pipeline.capture.packing import in_split


@pytest.mark.slow
def test_sweep_points_score_validation_documents_and_refuse_test(tmp_path, tiny_teacher_dir):
    corpus = write_short_docs(tmp_path)
    store = str(cache_short_docs(tmp_path / "store", tiny_teacher_dir, corpus))
    texts = corpus.read_text().split("\n\n")
    sides = {s: {i for i, t in enumerate(texts) if in_split(t, s, 0.3)} for s in ("validation", "test")}
    assert sides["validation"] and sides["test"]
    args = argparse.Namespace(teacher=str(tiny_teacher_dir), seed=0, device="cpu", fp32=True)
    run = quality.Run({"ce_point": {"store": "full", "losses": [{"name": "ce"}]}}, {"full": store}, {},
                      tmp_path / "runs", Preset("tiny", None, (0, 1), 1, 2, 1e-3, 10_000, 2), args, steps=2)
    run.root.mkdir()
    scorer = quality.SplitScorer(store, "validation", 10_000, torch.device("cpu"))
    trained = quality.train_sweeps(["ce_point"], run, scorer)["ce_point"]
    assert scorer.docs == sides["validation"] and not scorer.docs & sides["test"]
    assert trained["split"] == "validation" and [x for x, _ in trained["curve"]] == [0, 2 * quality.ROW, 4 * quality.ROW]  # rows seen × the bench row
    assert len(trained["sample_ids"]) == 2 and (run.root / "ce_point" / "model" / "config.json").exists()
    with pytest.raises(ValueError, match="validation split only, not 'test'"):
        quality.train_sweeps(["ce_point"], run, quality.SplitScorer(store, "test", 10_000, torch.device("cpu")))
    with pytest.raises(ValueError, match="scoring split 'held_out'"):
        quality.SplitScorer(store, "held_out", 10_000, torch.device("cpu"))
