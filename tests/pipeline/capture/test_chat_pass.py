"""The teacher pass over a chat corpus: the store holds a loss_mask that plain pyarrow reads,
that costs well under 0.2 B/token, and that the spec and fingerprint record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kdstore.reader import StoreReader
from kdstore.spec import fingerprint
from kdstore.verify import verify_store
from pipeline.capture.pass_setup import build_provenance, build_spec, teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.config import CacheConfig, ConfigError, parse_config
from tests.chat_docs import cache_chat, chat_cache_config, write_chat_corpus


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("chat_pass")
    return cache_chat(root / "store", tiny_teacher_dir, write_chat_corpus(root))


def test_store_holds_the_planned_mask_readable_by_plain_pyarrow(chat_store, tiny_teacher_dir):
    reader = StoreReader(str(chat_store))
    assert reader.spec.loss_mask and verify_store(str(chat_store)).ok
    cfg = chat_cache_config(chat_store, tiny_teacher_dir, Path(reader.meta.provenance.corpus["paths"][0]))
    plans = {p.shard_id: p for p in plan_shards(cfg, teacher_for(cfg).tokenizer)}
    shard = reader.shard_ids()[0]
    table = pa.ipc.open_file(str(chat_store / "shards" / shard / "loss_mask.arrow")).read_all()
    raw = table.column("loss_mask").combine_chunks().flatten().to_numpy().reshape(len(table), -1)
    assert np.array_equal(raw.astype(bool), plans[shard].rows.loss_mask)
    assert np.array_equal(reader.read_shard(shard, ["loss_mask"])["loss_mask"], plans[shard].rows.loss_mask)
    assert 0 < raw.sum() < plans[shard].rows.valid.sum()


def test_inspect_reports_loss_mask_bytes_per_token(chat_store, capsys):
    from flows.cli import main

    assert main(["inspect", str(chat_store), "--json"]) == 0
    per_field = json.loads(capsys.readouterr().out)["bytes_per_token_per_field"]
    # 4-row shards: mostly the Arrow file's own overhead (tests/kdstore/test_loss_mask.py: real shards)
    assert 0 < per_field["loss_mask"] < per_field["tokens"] / 2


def test_spec_and_fingerprint_record_the_mask(tmp_path, tiny_teacher_dir):
    corpus = write_chat_corpus(tmp_path)
    cfg = chat_cache_config(tmp_path / "s", tiny_teacher_dir, corpus)
    last = chat_cache_config(tmp_path / "s", tiny_teacher_dir, corpus, mask="last")
    teacher = teacher_for(cfg)
    spec = build_spec(cfg, teacher.facts)
    assert spec.to_dict()["loss_mask"] is True
    assert build_provenance(cfg, teacher).corpus["chat"]["mask"] == "assistant"
    prints = {fingerprint(build_spec(c, teacher.facts), build_provenance(c, teacher)) for c in (cfg, last)}
    assert len(prints) == 2
    plain = parse_config({"store": "x", "teacher": {"name": str(tiny_teacher_dir)}}, CacheConfig)
    assert "loss_mask" not in build_spec(plain, teacher.facts).to_dict()
    assert "chat" not in build_provenance(plain, teacher).corpus


def test_chat_config_mistakes_are_named(tiny_teacher_dir):
    with pytest.raises(ConfigError, match="corpus.chat is for kind 'chat'"):
        parse_config({"store": "x", "corpus": {"kind": "files", "paths": ["a"], "chat": {}}}, CacheConfig)
    with pytest.raises(ConfigError, match="signals.text is not available for chat"):
        parse_config({"store": "x", "corpus": {"kind": "chat", "paths": ["a"]}, "signals": {"text": True}}, CacheConfig)
    with pytest.raises(ConfigError, match="unknown key 'corpus.chat.maks'"):
        parse_config({"store": "x", "corpus": {"kind": "chat", "paths": ["a"], "chat": {"maks": "last"}}}, CacheConfig)


def test_plan_counts_conversations_and_sizes_the_mask(tmp_path, tiny_teacher_dir):
    from pipeline.capture.shard_plan import plan_cache

    plan = plan_cache(chat_cache_config(tmp_path / "s", tiny_teacher_dir, write_chat_corpus(tmp_path)))
    text = plan.to_markdown()
    assert "cut at a turn boundary" in text and "| loss_mask |" in text
    assert 0 < plan.loss_tokens < plan.valid_tokens and plan.est_bytes_per_token["loss_mask"] < 0.2
