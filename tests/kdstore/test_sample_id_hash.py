"""Sample ids compared by the hashes in the commit records: no store is read before step 1 to line up the
stores of a multi-teacher join, and stores written before the hash still join (read once)."""

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
    SAMPLE_ID_HASH,
    SHARDS_DIR,
    add_hashes,
    json_bytes,
    read_commit,
    sample_id_hash,
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


def _drop_hashes(store: str) -> None:
    """Rewrite every commit record as a kdcache from before the hash wrote it."""
    location = Location.of(store)
    for shard in StoreReader(store).shard_ids():
        record = read_commit(location, shard)
        old = dataclasses.replace(record, stats={k: v for k, v in record.stats.items() if k != SAMPLE_ID_HASH})
        location.write_bytes(json_bytes(old.to_json(), COMMIT_JSON_INDENT), SHARDS_DIR, shard, COMMIT_JSON)


def test_hash_is_order_free_and_adds_up_over_shards():
    ids = np.arange(1000) * 7 + 3
    whole = sample_id_hash(ids)
    assert whole == sample_id_hash(ids[::-1]) and 0 <= whole < 2**64
    assert add_hashes([sample_id_hash(ids[:300]), sample_id_hash(ids[300:])]) == whole
    assert sample_id_hash(ids[:-1]) != whole and sample_id_hash(np.append(ids[:-1], 4)) != whole
    assert sample_id_hash(np.append(ids, ids[0])) != whole  # a multiset: a repeated id counts


def test_stores_cut_differently_line_up_without_reading_a_shard(tmp_path):
    a = _store(tmp_path / "a", list(range(20)), 4)
    b = _store(tmp_path / "b", list(range(19, -1, -1)), 3, k=3)
    first = StoreReader(b).shard_ids()[0]
    assert StoreReader(b).record(first).stats[SAMPLE_ID_HASH] == sample_id_hash([19, 18, 17])  # in stats, as written
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
    _drop_hashes(old)
    assert verify_store(old).ok  # a record without the hash is a valid record
    readers = [CountingReader(a), CountingReader(old)]
    check_aligned(readers)
    assert readers[0].reads and sorted(readers[1].reads) == StoreReader(old).shard_ids()  # the fallback read
    _drop_hashes(short)
    with pytest.raises(StoreMismatchError, match=r"lacks 3 of the 20 sample ids"):
        check_aligned([StoreReader(a), StoreReader(short)])
