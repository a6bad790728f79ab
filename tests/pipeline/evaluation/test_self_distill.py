"""Self-distillation (born-again) from the cache, without Prefect: a student teaches the next store.

One module-scoped run (via `kdcache self-distill --no-flow`): the tiny random teacher over 40 short
documents (split train, val_fraction 0.3, rows of 32 tokens, top-8), 2 rounds of 2 training steps
of a 1-layer student cut from the teacher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from short_docs import cache_section, write_short_docs

from flows.cli import main
from kdstore.reader import StoreReader
from pipeline.capture.teacher import weights_digest
from pipeline.capture.teacher_pass import run_cache
from pipeline.capture.teacher_source import NotAModelError, resolve_teacher, teacher_label
from pipeline.config import CacheConfig, ConfigError, parse_config
from pipeline.evaluation.self_distill_rounds import run_self_distill
from pipeline.train.self_distill import RESULT_JSON, RESULT_MD, SelfDistillConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_short_docs(tmp_path_factory.mktemp("sd_corpus"))


def _config(out: Path, teacher: Path | str, corpus: Path, **over) -> dict:
    data = {
        "out": str(out), "rounds": 2, "eval_tokens": 256,
        "cache": cache_section(teacher, corpus),
        "train": {"student": {"init": "teacher_layers", "teacher": str(teacher), "num_layers": 1},
                  "losses": [{"name": "fkl"}, {"name": "ce", "weight": 0.5}], "batch_size": 2, "steps": 2,
                  "lr": 1e-3, "warmup_steps": 1, "device": "cpu", "tensorboard": False},
    }
    data.update(over)
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir, corpus) -> Path:
    out = tmp_path_factory.mktemp("self_distill") / "run"
    path = out.parent / "sd.yaml"
    path.write_text(yaml.safe_dump(_config(out, tiny_teacher_dir, corpus)))
    assert main(["self-distill", "--no-flow", str(path)]) == 0
    return out


def _rounds(out: Path) -> list[dict]:
    return json.loads((out / RESULT_JSON).read_text())["rounds"]


def test_each_student_teaches_the_next_store(run, tiny_teacher_dir):
    first, second = StoreReader(run / "round0" / "store"), StoreReader(run / "round1" / "store")
    student1 = run / "round0" / "student1" / "model"
    teacher_prov, student_prov = first.meta.provenance.teacher, second.meta.provenance.teacher
    assert teacher_prov["weights_sha256"] == weights_digest(tiny_teacher_dir)
    assert student_prov["weights_sha256"] == weights_digest(student1) != teacher_prov["weights_sha256"]
    assert student_prov["name"] == "student1" and student_prov["revision"] is None
    assert student_prov["tokenizer_sha256"] == teacher_prov["tokenizer_sha256"]
    assert first.fingerprint != second.fingerprint
    # same corpus, packing and tokenizer: the same rows under the same sample ids
    assert np.array_equal(first.sample_ids(), second.sample_ids()) and len(first.sample_ids()) > 4
    ids = first.sample_ids()[:6].tolist()
    assert np.array_equal(first.read_samples(ids, ["input_ids"])["input_ids"],
                          second.read_samples(ids, ["input_ids"])["input_ids"])
    # the stored distributions are the student's, not the teacher's
    a, b = (r.read_samples(ids, ["topk_logp"])["topk_logp"] for r in (first, second))
    assert not np.allclose(a, b)


def test_rounds_record_finite_perplexities(run, tiny_teacher_dir):
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [0, 1]
    assert [r["teacher"] for r in rounds] == [tiny_teacher_dir.name, "student1"]  # folder names, not paths
    assert [r["student"] for r in rounds] == ["student1", "student2"]
    for r in rounds:
        assert r["ppl"] is not None and math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert math.isfinite(r["teacher_ppl"]) and r["kl_to_teacher"] > -1e-6 and r["steps"] == 2
        assert r["trained_this_run"] and r["heldout_tokens"] == rounds[0]["heldout_tokens"] > 0
    # round 1's teacher is student 1, scored on the same held-out rows in round 0
    assert rounds[1]["teacher_ppl"] == pytest.approx(rounds[0]["ppl"], rel=1e-5)
    md = (run / RESULT_MD).read_text()
    assert "| 1 | student1 | student2 |" in md


def test_rerun_does_no_teacher_work_and_no_training(run, tiny_teacher_dir, corpus):
    shard_files = sorted(p for p in run.glob("round*/store/shards/**/*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files}
    logs = {p: p.read_text() for p in run.glob("round*/student*/train_log.jsonl")}
    before = _rounds(run)
    written = run_self_distill(_config(run, tiny_teacher_dir, corpus), progress=None)
    assert len(shard_files) > 8 and {p: p.stat().st_mtime_ns for p in shard_files} == mtimes
    assert sorted(p for p in run.glob("round*/store/shards/**/*") if p.is_file()) == shard_files
    assert len(logs) == 2 and all(p.read_text() == text for p, text in logs.items())
    for old, new in zip(before, written["rounds"], strict=True):
        assert new["shards_computed"] == 0 and not new["trained_this_run"]
        assert new["fingerprint"] == old["fingerprint"] and new["ppl"] == pytest.approx(old["ppl"], rel=1e-6)


def test_a_student_run_folder_and_its_model_folder_both_teach(run, tiny_teacher_dir):
    student = run / "round0" / "student1"
    assert resolve_teacher(str(student)) == str(student / "model")
    assert resolve_teacher(str(student / "model")) == str(student / "model")
    assert resolve_teacher(str(tiny_teacher_dir)) == str(tiny_teacher_dir)  # a plain model folder: unchanged
    assert resolve_teacher("default") == "default"
    assert teacher_label(str(student / "model"), str(student / "model")) == "student1"
    # naming model/ instead of the run folder gives the same store: nothing to recompute
    store = StoreReader(run / "round1" / "store")
    again = run_cache(parse_config({
        "store": str(run / "round1" / "store"), "teacher": {"name": str(student / "model"), "batch_size": 4},
        **{k: v for k, v in json.loads((run / RESULT_JSON).read_text())["config"]["cache"].items()
           if k not in ("store", "teacher")}}, CacheConfig), progress=None)
    assert again["shards_computed"] == 0 and again["fingerprint"] == store.fingerprint


def test_bad_teacher_folders_are_named(tmp_path, corpus):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError, match=f"{empty}.* not a model: no config.json and no weight files"):
        run_self_distill(_config(tmp_path / "out", empty, corpus), progress=None)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(NotAModelError, match=f"{unfinished}.*training has not finished"):
        resolve_teacher(str(unfinished))
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump({"store": str(tmp_path / "s"), "teacher": {"name": str(empty)},
                                      "corpus": {"kind": "files", "paths": [str(corpus)]}}))
    assert main(["cache", "--no-flow", str(config)]) == 2


def test_config_errors_name_the_key(tmp_path, corpus, tiny_teacher_dir):
    good = _config(tmp_path, tiny_teacher_dir, corpus)
    with pytest.raises(ConfigError, match="key 'cache': `store` is set per round"):
        parse_config({**good, "cache": {**good["cache"], "store": "x"}}, SelfDistillConfig)
    with pytest.raises(ConfigError, match="`out` is set per round"):
        parse_config({**good, "train": {**good["train"], "out": "x"}}, SelfDistillConfig)
    with pytest.raises(ConfigError, match="split must be 'train'"):
        parse_config({**good, "cache": {**good["cache"], "split": "all"}}, SelfDistillConfig)
    with pytest.raises(ConfigError, match="unknown key 'cache.teacher.nme'"):
        parse_config({**good, "cache": {**good["cache"], "teacher": {"nme": "x"}}}, SelfDistillConfig)
    with pytest.raises(ConfigError, match="key 'rounds'"):
        parse_config({**good, "rounds": 0}, SelfDistillConfig)
    cfg = parse_config(good, SelfDistillConfig)
    assert parse_config(cfg.model_dump(), SelfDistillConfig) == cfg  # what the flow passes round-trips
