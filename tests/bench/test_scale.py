"""bench/scale.py at a small size: the store it writes is a real, verifiable sampled-12 store,
and every figure of its report is there (timings are not asserted: the bench reports them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.scale import VOCAB, main, synthetic_rows


def test_synthetic_rows_are_what_a_sampled_12_pass_writes():
    rows = synthetic_rows(np.random.default_rng(0), 4, 64)
    counts, ids = rows["draw_counts"], rows["draw_ids"]
    assert (counts.sum(-1) == 12).all() and ids.max() < VOCAB
    kept = counts > 0
    assert (np.diff(kept.astype(int), axis=-1) <= 0).all()  # uniques packed at the front
    padded = np.where(kept, ids, VOCAB)
    assert (np.diff(padded, axis=-1)[kept[..., 1:]] > 0).all()  # sorted, unique
    assert 2 < kept.sum(-1).mean() < 9


@pytest.mark.slow
def test_small_scale_run_reports_every_figure(tmp_path, capsys):
    result = main(["--tokens", "100000", "--row-length", "256", "--shard-rows", "64", "--out", str(tmp_path),
                   "--first-rounds", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["tokens"] >= 100000 and last["shards"] == 7 and result["tokens"] == last["tokens"]
    for key in ("writer_tokens_per_s", "inspect_s", "verify_cli_s", "tokens_per_s_per_core_on",
                "tokens_per_s_per_core_off", "first_batch_s", "first_batch_one_shard_s", "peak_rss_kb",
                "peak_rss_small_kb"):
        assert last[key] > 0, key
    assert last["warm"]["verify_s"] > 0 and last["cold"]["cat_s"] > 0
    assert last["stream_on"]["tokens"] == last["tokens"] == last["stream_off"]["tokens"]  # a whole epoch each
    assert len(last["stream_on_off_per_round"]) == 2 and all(r > 0 for r in last["stream_on_off_per_round"])
    assert len(last["first_batch_runs_s"]["one"]) == len(last["first_batch_runs_s"]["big"]) == 2
    assert set(last["met"]) >= {"verify_vs_cat", "stream_verify_vs_off", "first_batch_vs_one_shard", "rss_big_vs_small"}
