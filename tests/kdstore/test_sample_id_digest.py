"""Sample ids compared from the commit records: no store is read before step 1 to line up the
stores of a multi-teacher join, and stores written before the digest still join (read once)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kdstore.errors import StoreMismatchError
from kdstore.join import StoreJoin, check_aligned
from kdstore.location import Location
from kdstore.reader import StoreReader
from kdstore.records import (
    COMMIT_JSON,
    COMMIT_JSON_INDENT,
    SHARDS_DIR,
    combine_sample_id_digests,
    json_bytes,
    read_commit,
    sample_id_digest,
)
from kdstore.spec import Provenance, StoreSpec, TopKSpec
from kdstore.verify import verify_store
from kdstore.writer import StoreWriter

T, K, V = 4, 2, 50


class CountingReader(StoreReader):
    """A real reader that notes which shards it decodes."""

    def __init__(self, url):
        super().__init__(url)
        self.reads: list[str] = []

    def read_shard(self, shard_id, fields=None, rows=None):
        self.reads.append(shard_id)
        return super().read_shard(shard_id, fields, rows)


def _store(path, ids: list[int], shard_rows: int, k: int = K) -> str:
    """Rows whose tokens follow from their sample id, so two stores agree row by row."""
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=shard_rows, topk=TopKSpec(k=k))
    writer = StoreWriter(str(path), spec, Provenance(teacher={"name": f"k{k}"}, corpus={"source": "c"}))
    for start in range(0, len(ids), shard_rows):
        part = np.array(ids[start:start + shard_rows])
        n = len(part)
        logp = np.log(np.full((n, T, k), 1.0 / (k + 1), np.float32))
        writer.write_shard(f"s{start:04d}", {
            "sample_id": part, "input_ids": (part[:, None] * 3 + np.arange(T)) % V, "doc_ids": np.zeros((n, T), np.int32),
            "valid": np.ones((n, T), bool), "topk_ids": np.broadcast_to(np.arange(k), (n, T, k)),
            "topk_logp": logp, "topk_tail": 1 - np.exp(logp).sum(-1)})
    return str(path)


def _drop_digests(store: str) -> None:
    """Rewrite every commit record as a kdcache from before the digest wrote it."""
    location = Location.of(store)
    for shard in StoreReader(store).shard_ids():
        old = dataclasses.replace(read_commit(location, shard), sample_id_digest=None)
        location.write_bytes(json_bytes(old.to_json(), COMMIT_JSON_INDENT), SHARDS_DIR, shard, COMMIT_JSON)


def test_digest_is_order_free_and_adds_up_over_shards():
    ids = np.arange(1000) * 7 + 3
    whole = sample_id_digest(ids)
    assert whole == sample_id_digest(ids[::-1]) and len(whole) == 16
    assert combine_sample_id_digests([sample_id_digest(ids[:300]), sample_id_digest(ids[300:])]) == whole
    assert sample_id_digest(ids[:-1]) != whole and sample_id_digest(np.append(ids[:-1], 4)) != whole


def test_stores_cut_differently_line_up_without_reading_a_shard(tmp_path):
    a = _store(tmp_path / "a", list(range(20)), 4)
    b = _store(tmp_path / "b", list(range(19, -1, -1)), 3, k=3)
    readers = [CountingReader(a), CountingReader(b)]
    check_aligned(readers)
    assert readers[0].reads == [] and readers[1].reads == []
    join = StoreJoin(readers, ["topk_ids", "t1/topk_ids"])
    primary = readers[0].read_shard(readers[0].shard_ids()[0], join.primary_fields)
    readers[1].reads.clear()
    got = join.read(primary)  # the join reads only the shards of store b whose id ranges hold these ids
    assert got["t1/topk_ids"].shape == (4, T, 3) and 1 <= len(set(readers[1].reads)) <= 2


def test_missing_ids_are_named_and_old_stores_are_read_once(tmp_path):
    a = _store(tmp_path / "a", list(range(20)), 4)
    short = _store(tmp_path / "short", list(range(17)), 4)
    with pytest.raises(StoreMismatchError, match=r"'.*short' \(teacher 1\) lacks 3 of the 20 sample ids .*\[17, 18, 19\]"):
        check_aligned([StoreReader(a), StoreReader(short)])
    old = _store(tmp_path / "old", list(range(20)), 5)
    _drop_digests(old)
    assert verify_store(old).ok  # a record without the digest is a valid record
    readers = [CountingReader(a), CountingReader(old)]
    check_aligned(readers)
    assert readers[0].reads and sorted(readers[1].reads) == StoreReader(old).shard_ids()  # the fallback read
    _drop_digests(short)
    with pytest.raises(StoreMismatchError, match=r"lacks 3 of the 20 sample ids"):
        check_aligned([StoreReader(a), StoreReader(short)])
