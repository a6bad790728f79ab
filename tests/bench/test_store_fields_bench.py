"""`python -m bench.store_fields`: per-column bytes of a real store, the label share of its draws,
and a lossless re-write (same rows, same layout → the same bytes; more rows per shard → fewer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import store_fields
from kdstore.spec import Provenance, SampledSpec, StoreSpec
from kdstore.writer import StoreWriter

PROVENANCE = Provenance(teacher={"name": "t"}, corpus={"source": "unit-test"}, packing={})


def write_store(path, shards=4, rows=4, T=16, V=300):
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=rows, topk=None, sampled=SampledSpec(n_draws=4))
    writer = StoreWriter(path, spec, PROVENANCE)
    rng = np.random.default_rng(0)
    for s in range(shards):
        inp = rng.integers(0, V - 1, size=(rows, T))
        first = rng.integers(0, V - 1, size=(rows, T))
        coin = rng.random((rows, T - 1)) < 0.5
        first[:, :-1] = np.where(coin, inp[:, 1:], first[:, :-1])  # half the positions draw the next token
        ids = np.stack([first, first + 1], -1)  # two ascending ids
        label = (ids[:, :-1] == inp[:, 1:, None]).any(-1)
        counts = np.zeros((rows, T, 4), np.int64)
        counts[..., :2] = 2
        full = np.zeros((rows, T, 4), np.int64)
        full[..., :2] = ids
        writer.write_shard(f"s-{s}", {"sample_id": np.arange(s * rows, (s + 1) * rows), "input_ids": inp,
                                      "doc_ids": np.zeros((rows, T), np.int32), "valid": np.ones((rows, T), bool),
                                      "draw_ids": full, "draw_counts": counts})
        yield int(label.sum())


def test_store_fields_counts_columns_labels_and_rewrites_losslessly(tmp_path, capsys):
    labels = sum(write_store(tmp_path / "store"))
    assert 0 < labels < 4 * 4 * 15
    assert store_fields.main([str(tmp_path / "store"), "--rewrite", "4:1,16:19"]) == 0
    (result,) = json.loads(capsys.readouterr().out.splitlines()[-1])["stores"]
    tokens = 4 * 4 * 16
    assert result["tokens"] == tokens
    draws = result["draws"]["draws"]
    assert draws["ids_per_token"] == 2 and draws["drawn_once_share"] == 0
    assert draws["label_among_draws"] == pytest.approx(labels / tokens)
    assert result["columns"]["draws/draw_ids"]["values_per_token"] == 2
    assert result["columns"]["draws/draw_n"]["stored_dtype"] == "uint8"
    same, bigger = result["rewrites"]
    assert same["bytes_per_token"] == result["bytes_per_token"]  # same rows, same layout: the same files
    assert sum(bigger["bytes_per_token"].values()) < sum(same["bytes_per_token"].values())


def test_store_fields_refuses_what_is_not_a_store_or_a_bad_rewrite(tmp_path):
    with pytest.raises(SystemExit, match="no store.json"):
        store_fields.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="want ROWS:LEVEL"):
        store_fields.main([str(tmp_path), "--rewrite", "64"])
