"""KDStream: exactly-once over ranks × workers, determinism, exact resume, content."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdstore.reader import StoreReader
from kdstore.spec import Provenance, StoreSpec, TopKSpec
from kdstore.torch_stream import KDLoader, KDStream
from kdstore.writer import StoreWriter

T, K, V = 8, 4, 300
SHARD_SIZES = [5, 3, 7, 1, 6]  # uneven on purpose


def _rows(first_id: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    logits = rng.normal(size=(n, T, V))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1)[..., :K]
    vals = np.take_along_axis(logp, ids, -1).astype(np.float32)
    return {
        "sample_id": np.arange(first_id, first_id + n) * 7 + 3,  # not contiguous, not from 0
        "input_ids": rng.integers(0, V, (n, T)),
        "doc_ids": np.zeros((n, T), np.int32),
        "valid": np.ones((n, T), bool),
        "topk_ids": ids,
        "topk_logp": vals,
        "topk_tail": (1 - np.exp(vals).sum(-1)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("stream") / "store")
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=8, topk=TopKSpec(k=K), record_batch_rows=2)
    writer = StoreWriter(path, spec, Provenance(teacher={"name": "random"}))
    rng = np.random.default_rng(0)
    first = 0
    for i, n in enumerate(SHARD_SIZES):
        writer.write_shard(f"s{i:02d}", _rows(first, n, rng))
        first += n
    return path


def _all_ids(store: str) -> list[int]:
    reader = StoreReader(store)
    return sorted(int(x) for s in reader.shard_ids() for x in reader.read_shard(s, ["sample_id"])["sample_id"])


def _ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b["sample_id"]]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (3, 2), (4, 1)])
def test_every_row_exactly_once_per_epoch(store, world, workers):
    seen = []
    for rank in range(world):
        stream = KDStream(store, ["topk_ids"], batch_size=3, seed=5, buffer_rows=4, rank=rank, world_size=world)
        seen += _ids(KDLoader(stream, num_workers=workers))
    assert sorted(seen) == _all_ids(store)


def test_ranks_get_balanced_rows(store):
    counts = []
    for rank in range(3):
        stream = KDStream(store, [], batch_size=2, rank=rank, world_size=3)
        counts.append(len(_ids(stream)))
    assert max(counts) - min(counts) <= 1


def test_order_is_seeded_and_changes_with_epoch(store):
    a = KDStream(store, [], batch_size=4, seed=1)
    b = KDStream(store, [], batch_size=4, seed=1)
    first, again = _ids(a), _ids(b)
    assert first == again
    second_epoch = _ids(a)  # a full pass moves the stream to the next epoch
    assert sorted(second_epoch) == sorted(first) and second_epoch != first
    assert _ids(KDStream(store, [], batch_size=4, seed=2)) != first
    assert _ids(KDStream(store, [], batch_size=4, shuffle=False)) == _all_ids(store)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(store, workers):
    def make():
        return KDLoader(KDStream(store, ["topk_logp"], batch_size=2, seed=9, buffer_rows=3), num_workers=workers)

    full = [(_ids([b]), b["topk_logp"].clone()) for b in make()]
    loader = make()
    head = []
    for batch in itertools.islice(iter(loader), 4):
        head.append((_ids([batch]), batch["topk_logp"].clone()))
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [(_ids([b]), b["topk_logp"].clone()) for b in resumed]
    got = head + tail
    assert [ids for ids, _ in got] == [ids for ids, _ in full]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(got, full, strict=True))


def test_batches_hold_the_stored_rows(store):
    reader = StoreReader(store)
    for batch in KDStream(store, ["topk_ids", "topk_logp", "topk_tail", "input_ids"], batch_size=4, seed=3):
        ref = reader.read_samples(batch["sample_id"].tolist(), ["topk_ids", "topk_logp", "topk_tail", "input_ids"])
        for name, value in ref.items():
            assert batch[name].dtype == torch.from_numpy(value).dtype
            assert np.array_equal(batch[name].numpy(), value)


def test_drop_last_and_dtypes(store):
    batches = list(KDStream(store, ["topk_ids", "topk_logp", "input_ids"], batch_size=4, drop_last=True))
    assert all(len(b["sample_id"]) == 4 for b in batches)
    assert len(batches) == sum(SHARD_SIZES) // 4
    b = batches[0]
    assert b["topk_ids"].dtype == torch.int32 and b["topk_logp"].dtype == torch.float32
    assert b["input_ids"].dtype == torch.int64 and b["topk_ids"].shape == (4, T, K)


def test_resume_refuses_other_topology_or_store(store, tmp_path):
    loader = KDLoader(KDStream(store, [], batch_size=2), num_workers=0)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        KDStream(store, [], batch_size=2, rank=0, world_size=2).load_state_dict(state)
    stream = KDStream(store, [], batch_size=2)
    stream.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        KDLoader(stream, num_workers=2)
    bad = dict(state, fingerprint="0" * 32)
    with pytest.raises(ValueError, match="fingerprint"):
        KDStream(store, [], batch_size=2).load_state_dict(bad)


def test_unknown_field_is_refused_up_front(store):
    from kdstore.errors import MissingFieldError

    with pytest.raises(MissingFieldError, match="hidden_3"):
        KDStream(store, ["hidden_3"], batch_size=2)


def test_rows_lingering_in_the_buffer_keep_their_values_and_memory_stays_bounded(tmp_path, monkeypatch):
    """Shards big enough to be compacted (only the rows still to come kept): every row comes out
    once with its own values, and the stream never holds more rows than a few shards' worth."""
    path = str(tmp_path / "store")
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=100, topk=TopKSpec(k=K), record_batch_rows=16)
    writer = StoreWriter(path, spec, Provenance(teacher={"name": "random"}))
    rng = np.random.default_rng(3)
    for i in range(12):
        writer.write_shard(f"b{i:02d}", _rows(100 * i, 100, rng))
    reader = StoreReader(path)
    truth = {}
    for shard in reader.shard_ids():
        part = reader.read_shard(shard, ["sample_id", "topk_logp"])
        truth.update({int(s): v for s, v in zip(part["sample_id"], part["topk_logp"], strict=True)})
    held = []
    compact = KDStream._compact

    def watch(self, cache, rowmap, shard, rest, left):
        compact(self, cache, rowmap, shard, rest, left)
        held.append(sum(len(entry["sample_id"]) for entry in cache.values() if entry is not None))

    monkeypatch.setattr(KDStream, "_compact", watch)
    stream = KDStream(reader, ["topk_logp"], 7, seed=1, buffer_rows=150, rank=0, world_size=1)
    seen = []
    for batch in stream:
        for sid, logp in zip(batch["sample_id"].tolist(), batch["topk_logp"].numpy(), strict=True):
            np.testing.assert_array_equal(logp, truth[sid])
            seen.append(sid)
    assert sorted(seen) == sorted(truth)
    assert held and max(held) <= 6 * 100, max(held)  # 1200 rows in the store; whole shards would pile up


def _loop_buffer_shuffle(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The warm-up shuffle buffer as its docstring tells it, one item at a time."""
    steps = min(size - 1, (n - 1) // 2)
    if steps == size - 1:
        steps = max(steps, n - size)
    draws = rng.random(steps)
    out, buffer, nxt = [], [0], 1
    for i in range(steps):
        if len(buffer) < size:  # warm-up: a new slot as well as the refill
            buffer.append(nxt)
            nxt += 1
        j = int(draws[i] * min(i + 2, size))
        out.append(buffer[j])
        buffer[j] = nxt
        nxt += 1
    rest = np.array(buffer + list(range(nxt, n)), dtype=np.int64)
    return np.array(out + rest[rng.permutation(len(rest))].tolist(), dtype=np.int64)


@pytest.mark.parametrize("size", [1, 2, 3, 16, 100])
def test_buffer_shuffle_is_the_documented_warm_up_buffer(size):
    from kdstore.torch_stream import _buffer_shuffle

    for n in (1, 2, 3, 7, 31, 64, 250):
        got = _buffer_shuffle(n, size, np.random.default_rng([n, size]))
        np.testing.assert_array_equal(got, _loop_buffer_shuffle(n, size, np.random.default_rng([n, size])))
        assert sorted(got.tolist()) == list(range(n))
    early = _buffer_shuffle(10_000, 1024, np.random.default_rng(0))
    assert early[:8].max() < 16 and early[:100].max() < 200  # the first rows come from the front
    assert early[2000:3000].max() > 3000  # past warm-up the buffer mixes 1,024 rows


def test_first_batch_reads_one_shard_whatever_the_buffer(tmp_path):
    """A buffer spanning the whole store still yields its first batch after one shard is read."""
    path = str(tmp_path / "store")
    spec = StoreSpec(vocab_size=V, row_length=T, shard_rows=32, topk=TopKSpec(k=K), record_batch_rows=8)
    writer = StoreWriter(path, spec, Provenance(teacher={"name": "random"}))
    rng = np.random.default_rng(4)
    for i in range(6):
        writer.write_shard(f"c{i:02d}", _rows(32 * i, 32, rng))

    class CountingReader(StoreReader):
        def read_shard(self, shard_id, fields=None, rows=None):
            reads.append(shard_id)
            return super().read_shard(shard_id, fields, rows)

    reads: list[str] = []
    stream = KDStream(CountingReader(path), ["topk_logp"], 8, seed=2, buffer_rows=1024, rank=0, world_size=1)
    first = next(iter(stream))
    assert len(reads) == 1 and len(first["sample_id"]) == 8
    assert {int(s) for s in first["sample_id"]} <= {int(s) for s in stream.reader.read_shard(reads[0], ["sample_id"])["sample_id"]}


def test_worker_rows_is_the_length_of_each_worker_order(store):
    stream = KDStream(store, [], batch_size=2, seed=3)
    for total in (1, 2, 3, 7):
        lengths = [len(stream.worker_order(1, w, total)) for w in range(total)]
        assert lengths == [stream.worker_rows(w, total) for w in range(total)] and sum(lengths) == sum(SHARD_SIZES)
