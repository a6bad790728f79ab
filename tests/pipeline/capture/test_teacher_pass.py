"""The teacher pass with a tiny random teacher: store contents, resumability, incremental corpora."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdstore.errors import FingerprintMismatchError, StoreError
from kdstore.reader import StoreReader
from kdstore.verify import verify_store
from pipeline.capture.pass_setup import teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config


def _config(store, teacher, **over):
    data = {
        "store": str(store),
        "teacher": {"name": str(teacher), "batch_size": 3},
        "corpus": {"kind": "builtin", "max_documents": 3},
        "row_length": 32,
        "shard_rows": 4,
        "split": "train",
        "signals": {"topk": {"k": 8}, "sampled": {"n_draws": 6}, "hidden": {"layers": [1]},
                    "attention": {"layers": [0], "heads": [0, 2]}},
    }
    for key, value in over.items():
        data[key] = value
    return parse_config(data, CacheConfig)


def _all_sample_ids(store):
    r = StoreReader(str(store))
    return [int(x) for s in r.shard_ids() for x in r.read_shard(s, ["sample_id"])["sample_id"]]


def test_pass_writes_what_a_fresh_forward_gives(tmp_path, tiny_teacher_dir):
    cfg = _config(tmp_path / "store", tiny_teacher_dir)
    summary = run_cache(cfg, progress=None)
    assert summary["shards_computed"] == summary["shards"] > 1
    assert verify_store(cfg.store).ok
    teacher = teacher_for(cfg)
    plans = plan_shards(cfg, teacher.tokenizer)
    ids = _all_sample_ids(cfg.store)
    assert sorted(ids) == sorted(int(s) for p in plans for s in p.rows.sample_ids)
    assert len(set(ids)) == len(ids)
    reader = StoreReader(cfg.store)
    plan = plans[1]
    got = reader.read_samples(plan.rows.sample_ids.tolist())
    with torch.no_grad():
        out = teacher.model(torch.from_numpy(plan.rows.input_ids.astype(np.int64)), output_hidden_states=True,
                            output_attentions=True)
    logp = torch.log_softmax(out.logits.double(), -1)
    ref_vals, ref_ids = logp.topk(8, -1)
    assert np.array_equal(got["topk_ids"], ref_ids.numpy())
    assert np.abs(got["topk_logp"] - ref_vals.numpy()).max() <= 1 / 32 + 1e-5  # codec bound: step/2
    assert np.allclose(got["topk_tail"], 1 - ref_vals.exp().sum(-1).numpy(), atol=1e-5)
    assert np.array_equal(got["input_ids"], plan.rows.input_ids)
    assert np.array_equal(got["valid"], plan.rows.valid)
    assert np.all(got["draw_counts"].sum(-1) == 6)
    hidden = out.hidden_states[1].numpy()
    assert np.abs(got["hidden_1"] - hidden).max() <= np.abs(hidden).max() * 2**-10
    attn = out.attentions[0][:, [0, 2]].numpy()
    assert np.abs(got["attn_0"] - attn).max() <= 0.5 / 255 + 1e-6
    head = reader.read_teacher_tensors("output_head")["weight"]
    ref_head = teacher.model.get_output_embeddings().weight.detach().numpy()
    assert head.shape == ref_head.shape and np.allclose(head, ref_head, atol=1e-3, rtol=1e-3)
    assert (Path(cfg.store) / "teacher" / "tokenizer" / "tokenizer.json").is_file()


def test_rerun_does_no_teacher_work(tmp_path, tiny_teacher_dir):
    cfg = _config(tmp_path / "store", tiny_teacher_dir, signals={"topk": {"k": 4}})
    first = run_cache(cfg, progress=None)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.store).rglob("*.arrow")}
    again = run_cache(cfg, progress=None)
    assert again["shards_computed"] == 0 and again["shards"] == first["shards"]
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.store).rglob("*.arrow")} == before


def test_incremental_corpus_files(tmp_path, tiny_teacher_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat. " * 40)
    (corpus / "b.txt").write_text("Python is a programming language. " * 40)
    cfg = _config(tmp_path / "store", tiny_teacher_dir, corpus={"kind": "files", "paths": [str(corpus)]},
                  signals={"topk": {"k": 4}}, split="all")
    first = run_cache(cfg, progress=None)
    (corpus / "c.txt").write_text("A third file arrives later. " * 30)
    second = run_cache(cfg, progress=None)
    assert second["shards_skipped"] == first["shards"]
    assert second["shards_computed"] == second["shards"] - first["shards"] > 0
    (corpus / "a.txt").write_text("The dog sat on the log. " * 40)  # change one file
    third = run_cache(cfg, progress=None)
    assert third["shards_retired"] > 0  # the old a.txt shards leave the store (moved aside)
    assert 0 < third["shards_computed"] < third["shards"]
    assert verify_store(cfg.store).ok
    assert any(p.name.startswith(".retired-") for p in (Path(cfg.store) / "shards").iterdir())


def test_bad_configs_are_refused(tmp_path, tiny_teacher_dir, make_tiny_teacher, smollm2_tokenizer):
    with pytest.raises(StoreError, match=r"signals.hidden.layers \[7\]"):
        run_cache(_config(tmp_path / "s1", tiny_teacher_dir, signals={"topk": {"k": 4}, "hidden": {"layers": [7]}}), progress=None)
    with pytest.raises(StoreError, match=r"signals.attention.heads \[9\]"):
        run_cache(_config(tmp_path / "s2", tiny_teacher_dir,
                          signals={"topk": {"k": 4}, "attention": {"layers": [0], "heads": [9]}}), progress=None)
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        run_cache(_config(tmp_path / "s3", tmp_path / "no_such_teacher"), progress=None)
    cfg = _config(tmp_path / "s4", tiny_teacher_dir, signals={"topk": {"k": 4}}, corpus={"kind": "builtin", "max_documents": 1})
    run_cache(cfg, progress=None)
    other = make_tiny_teacher(tmp_path / "other_teacher", smollm2_tokenizer, seed=1)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        run_cache(_config(tmp_path / "s4", other, signals={"topk": {"k": 4}}, corpus={"kind": "builtin", "max_documents": 1}), progress=None)


def test_long_documents_are_split_and_counted(tmp_path, tiny_teacher_dir):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "long.txt").write_text("word " * 500)
    cfg = _config(tmp_path / "store", tiny_teacher_dir, corpus={"kind": "files", "paths": [str(corpus)]},
                  signals={"topk": {"k": 4}}, split="all")
    run_cache(cfg, progress=None)
    reader = StoreReader(cfg.store)
    metas = [reader.record(s).meta for s in reader.shard_ids()]
    assert sum(m["long_docs"] for m in metas) == 1
    assert reader.num_rows() > 10


@pytest.mark.slow
def test_killed_pass_resumes_to_a_clean_store(tmp_path, tiny_teacher_dir):
    cfg = _config(tmp_path / "store", tiny_teacher_dir, signals={"topk": {"k": 8}, "hidden": {"layers": [1, 2]}},
                  corpus={"kind": "builtin", "max_documents": 12}, shard_rows=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    cmd = [sys.executable, "-m", "flows.cli", "cache", str(path), "--no-flow"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = Path(cfg.store) / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not (shards.exists() and len([p for p in shards.glob("*/COMMIT.json") if not p.parent.name.startswith(".")]) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert verify_store(cfg.store).ok  # what is visible is whole
    # pathlib's * also matches .tmp-* staging dirs: count committed shards only
    done_before = {p: p.stat().st_mtime_ns for p in shards.glob("*/COMMIT.json") if not p.parent.name.startswith(".")}
    summary = run_cache(cfg, progress=None)
    assert summary["shards_computed"] > 0
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # committed work was kept
    assert verify_store(cfg.store).ok
    ids = _all_sample_ids(cfg.store)
    plans = plan_shards(cfg, teacher_for(cfg).tokenizer)
    assert sorted(ids) == sorted(int(s) for p in plans for s in p.rows.sample_ids)
