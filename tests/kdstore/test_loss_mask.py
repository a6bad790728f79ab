"""The loss_mask field: written and read back exactly, refused on padding, and cheap on disk."""

from __future__ import annotations

import numpy as np
import pytest

from kdstore.errors import ShardDataError
from kdstore.reader import StoreReader
from kdstore.spec import Provenance, StoreSpec
from kdstore.summary import summarize
from kdstore.writer import StoreWriter

R, T = 64, 256  # a realistic shard: 16,384 tokens


def _rows(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Conversations of alternating prompt / response runs (20-120 tokens), padding at row ends."""
    mask = np.zeros((R, T), bool)
    valid = np.zeros((R, T), bool)
    for r in range(R):
        t, on = 0, False
        end = int(rng.integers(T // 2, T + 1))
        while t < end:
            n = int(rng.integers(20, 121))
            mask[r, t:min(t + n, end)] = on
            t, on = t + n, not on
        valid[r, :end] = True
    return {"sample_id": np.arange(R), "input_ids": rng.integers(0, 49152, (R, T)),
            "doc_ids": np.where(valid, 0, -1).astype(np.int32), "valid": valid, "loss_mask": mask & valid}


def test_loss_mask_round_trip_and_cost(tmp_path):
    spec = StoreSpec(vocab_size=49152, row_length=T, shard_rows=R, loss_mask=True)
    writer = StoreWriter(str(tmp_path / "s"), spec, Provenance())
    rows = _rows(np.random.default_rng(0))
    writer.write_shard("a", rows)
    got = StoreReader(str(tmp_path / "s")).read_shard("a", ["loss_mask"])["loss_mask"]
    assert got.dtype == bool and np.array_equal(got, rows["loss_mask"])
    per_token = summarize(str(tmp_path / "s")).field_bytes_per_token()["loss_mask"]
    assert per_token <= 0.2, per_token


def test_loss_mask_on_padding_is_refused(tmp_path):
    spec = StoreSpec(vocab_size=49152, row_length=T, shard_rows=R, loss_mask=True)
    rows = _rows(np.random.default_rng(1))
    rows["loss_mask"][0, -1], rows["valid"][0, -1] = True, False
    with pytest.raises(ShardDataError, match="'loss_mask' marks padding"):
        StoreWriter(str(tmp_path / "s"), spec, Provenance()).write_shard("a", rows)
