"""Crashes, corruption, bad input and bad specs: clear errors, nothing committed is lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from kdstore.errors import (
    CorruptShardError,
    FingerprintMismatchError,
    FormatVersionError,
    MissingFieldError,
    NotAStoreError,
    ShardDataError,
    SpecError,
    StoreError,
)
from kdstore.reader import StoreReader
from kdstore.records import RECORD_SHA256, record_checksum
from kdstore.spec import (
    FORMAT_VERSION,
    AttentionSpec,
    HiddenSpec,
    Provenance,
    StoreSpec,
    TopKSpec,
    fingerprint,
)
from kdstore.verify import verify_store
from kdstore.writer import StoreWriter


def _digest_tree(root: Path) -> dict[str, tuple[int, str]]:
    """Relative path → (mtime_ns, sha256) of every file below root."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _shard_entries(store: Path) -> list[str]:
    shards = store / "shards"
    return sorted(os.listdir(shards)) if shards.exists() else []


# ---------------------------------------------------------------- re-runs and store identity


def test_rerun_skips_committed_shards_and_changes_nothing(tmp_path, rows_for, provenance, spec_with):
    spec = spec_with()
    writer = StoreWriter(tmp_path, spec, provenance)
    rows = [rows_for(spec, 4, first_id=4 * i, seed=i) for i in range(2)]
    first = [writer.write_shard(f"s{i}", r) for i, r in enumerate(rows)]
    assert [r.skipped for r in first] == [False, False]
    before = _digest_tree(tmp_path)
    time.sleep(0.01)

    again = StoreWriter(tmp_path, spec, provenance)  # a second run of the same job
    second = [again.write_shard(f"s{i}", r) for i, r in enumerate(rows)]
    assert [r.skipped for r in second] == [True, True]
    assert [r.record for r in second] == [r.record for r in first]
    # even without skip_committed, a valid commit is never rewritten
    other = rows_for(spec, 4, first_id=0, seed=99)
    assert again.write_shard("s0", other, skip_committed=False).skipped
    assert again.write_shard("s1", rows[1], check="size").skipped
    assert _digest_tree(tmp_path) == before
    np.testing.assert_array_equal(StoreReader(tmp_path).read_shard("s0", ["input_ids"])["input_ids"], rows[0]["input_ids"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s, p: (StoreSpec(**{**s.__dict__, "vocab_size": 512}), p), "spec.vocab_size"),
        (lambda s, p: (StoreSpec(**{**s.__dict__, "topk": TopKSpec(k=6)}), p), "spec.topk"),
        (lambda s, p: (StoreSpec(**{**s.__dict__, "hidden": None}), p), "spec.hidden"),
        (lambda s, p: (s, Provenance(teacher={**p.teacher, "revision": "1"}, corpus=p.corpus, packing=p.packing)), "provenance.teacher"),
        (lambda s, p: (s, Provenance(teacher=p.teacher, corpus={"source": "other"}, packing=p.packing)), "provenance.corpus"),
    ],
)
def test_other_spec_or_provenance_is_refused(tmp_path, provenance, spec_with, change, named):
    spec = spec_with()
    StoreWriter(tmp_path, spec, provenance)
    store_json = (tmp_path / "store.json").read_bytes()
    other_spec, other_prov = change(spec, provenance)
    with pytest.raises(FingerprintMismatchError) as info:
        StoreWriter(tmp_path, other_spec, other_prov)
    message = str(info.value)
    assert named in message and fingerprint(spec, provenance) in message
    assert message.count("spec.") + message.count("provenance.") == 1  # only the differing key
    assert (tmp_path / "store.json").read_bytes() == store_json


def test_newer_format_version_is_refused(tmp_path, rows_for, provenance, spec_with):
    spec = spec_with()
    StoreWriter(tmp_path, spec, provenance).write_shard("a", rows_for(spec, 1))
    data = json.loads((tmp_path / "store.json").read_text())
    data["format_version"] += 1
    (tmp_path / "store.json").write_text(json.dumps(data))
    for open_it in (StoreReader, lambda url: StoreWriter(url, spec, provenance), verify_store):
        with pytest.raises(FormatVersionError, match=f"format version {FORMAT_VERSION + 1}"):
            open_it(str(tmp_path))


def test_not_a_store(tmp_path, provenance, spec_with):
    missing = tmp_path / "nowhere"
    with pytest.raises(NotAStoreError) as info:
        StoreReader(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(NotAStoreError, match="store.json"):
        verify_store(str(missing))
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(NotAStoreError, match="not valid JSON"):
        StoreReader(tmp_path)
    (tmp_path / "store.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotAStoreError, match="not a kdcache store"):
        StoreWriter(tmp_path, spec_with(), provenance)


# ---------------------------------------------------------------- reader errors


def test_reader_missing_field_and_unknown_sample(tmp_path, rows_for, provenance):
    spec = StoreSpec(vocab_size=100, row_length=3, shard_rows=2, topk=TopKSpec(k=2))
    StoreWriter(tmp_path, spec, provenance).write_shard("a", rows_for(spec, 2, first_id=5))
    reader = StoreReader(tmp_path)
    with pytest.raises(MissingFieldError) as info:
        reader.read_shard("a", ["topk_ids", "hidden_3"])
    message = str(info.value)
    assert "hidden_3" in message
    assert all(name in message for name in ("sample_id", "input_ids", "topk_ids", "topk_logp", "topk_tail"))
    with pytest.raises(MissingFieldError, match="draw_ids"):
        reader.read_samples([5], ["draw_ids"])
    with pytest.raises(KeyError, match="999"):
        reader.read_samples([5, 999])
    with pytest.raises(MissingFieldError, match="lm_head"):
        reader.read_teacher_tensors("lm_head")


# ---------------------------------------------------------------- teacher tensors


def test_teacher_tensors_round_trip(tmp_path, provenance, spec_with):
    rng = np.random.default_rng(0)
    tensors = {
        "lm_head.weight": rng.standard_normal((17, 8)).astype(np.float32),
        "embed_tokens.weight": rng.standard_normal((17, 8)).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
        "strided": rng.standard_normal((6, 4)).astype(np.float32)[::2].T,  # not contiguous
    }
    writer = StoreWriter(tmp_path, spec_with(), provenance)
    path = writer.write_teacher_tensors("head", tensors)
    assert path.endswith("teacher/head.safetensors")
    for got in (StoreReader(tmp_path).read_teacher_tensors("head"), safetensors.numpy.load_file(path)):
        assert sorted(got) == sorted(tensors)
        for name, value in tensors.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape
            assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    writer.write_teacher_tensors("head", tensors)  # idempotent
    with pytest.raises(StoreError, match="other contents"):
        writer.write_teacher_tensors("head", {**tensors, "ids": np.arange(1, 6)})
    assert not list((tmp_path / "teacher").glob("*.tmp-*"))


# ---------------------------------------------------------------- bad writes


def _bad(name, mutate, *named):
    return pytest.param(mutate, named, id=name)


def _set(field, index, value):
    def mutate(rows):
        rows[field] = rows[field].astype(np.int64)  # every value must fit the array handed over
        rows[field][index] = value

    return mutate


BAD_ROWS = [
    _bad("missing", lambda r: r.pop("topk_tail"), "topk_tail"),
    _bad("text-not-str", lambda r: r.update(text=np.array([1, 2, 3], dtype=object)), "text", "dtype"),
    _bad("text-shape", lambda r: r.update(text=r["text"][:2]), "text", "(2,)"),
    _bad("missing-dense", lambda r: r.pop("hidden_2"), "hidden_2"),
    _bad("extra", lambda r: r.update(logits=np.zeros((3, 8))), "logits"),
    _bad("shape", lambda r: r.update(input_ids=r["input_ids"][:, :-1]), "input_ids", "(3, 7)"),
    _bad("shape-k", lambda r: r.update(topk_ids=r["topk_ids"][..., :4]), "topk_ids"),
    _bad("shape-hidden", lambda r: r.update(hidden_0=r["hidden_0"][..., :8]), "hidden_0"),
    _bad("draws-too-wide", lambda r: r.update(draw_ids=np.pad(r["draw_ids"], ((0, 0), (0, 0), (0, 1)))), "draw_ids"),
    _bad("draws-mismatch", lambda r: r.update(draw_counts=r["draw_counts"][..., :-1]), "draw_counts"),
    _bad("float-ids", lambda r: r.update(topk_ids=r["topk_ids"].astype(np.float32)), "topk_ids", "float32"),
    _bad("float-input-ids", lambda r: r.update(input_ids=r["input_ids"].astype(np.float64)), "input_ids"),
    _bad("int-logp", lambda r: r.update(topk_logp=r["topk_logp"].astype(np.int32)), "topk_logp"),
    _bad("float-valid", lambda r: r.update(valid=r["valid"].astype(np.float32)), "valid"),
    _bad("id-too-big", _set("input_ids", (1, 3), 256), "input_ids", "uint8"),
    _bad("id-negative", _set("topk_ids", (0, 0, 0), -1), "topk_ids"),
    _bad("draw-id-too-big", _set("draw_ids", (2, 0, 0), 1000), "draw_ids"),
    _bad("count-too-big", _set("draw_counts", (0, 1, 0), 300), "draw_counts"),
    _bad("count-negative", _set("draw_counts", (0, 1, 1), -2), "draw_counts"),
    _bad("doc-id-too-big", _set("doc_ids", (0, 0), 1 << 40), "doc_ids"),
    _bad("attention-pos", _set("attn_1_ids", (0, 0, 0, 0), 9999), "attn_1_ids"),
    _bad("duplicate-ids", lambda r: r.update(sample_id=np.array([4, 5, 4])), "sample_id"),
    _bad("negative-id", lambda r: r.update(sample_id=np.array([-1, 5, 6])), "sample_id"),
    _bad("float-sample-id", lambda r: r.update(sample_id=r["sample_id"].astype(float)), "sample_id"),
    _bad("too-many-rows", None, "5 rows", "allows 4"),
]


@pytest.mark.parametrize(("mutate", "named"), BAD_ROWS)
def test_bad_rows_are_refused_and_nothing_is_written(tmp_path, rows_for, provenance, spec_with, mutate, named):
    spec = spec_with(attention=AttentionSpec(layers=(1,), heads=(0,), topk=2))
    writer = StoreWriter(tmp_path, spec, provenance)
    if mutate is None:
        rows = rows_for(spec, 5)
    else:
        rows = rows_for(spec, 3)
        mutate(rows)
    with pytest.raises(ShardDataError) as info:
        writer.write_shard("bad-1", rows)
    message = str(info.value)
    assert "'bad-1'" in message, message
    for text in named:
        assert text in message, message
    assert _shard_entries(tmp_path) == []
    assert StoreReader(tmp_path).shard_ids() == []
    # the same shard id takes good rows afterwards
    assert not writer.write_shard("bad-1", rows_for(spec, 3)).skipped
    assert verify_store(str(tmp_path)).ok


@pytest.mark.parametrize("shard_id", ["", ".hidden", "a/b", "../up", "x" * 200, "tab\tid", "a@b"])
def test_invalid_shard_ids_are_refused(tmp_path, rows_for, provenance, spec_with, shard_id):
    spec = spec_with()
    writer = StoreWriter(tmp_path, spec, provenance)
    with pytest.raises(ShardDataError) as info:
        writer.write_shard(shard_id, rows_for(spec, 2))
    assert repr(shard_id) in str(info.value)
    assert _shard_entries(tmp_path) == []
    assert not (tmp_path / "up").exists()


# ---------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _refingerprint(path: Path) -> None:
    """A well-formed commit record of another store (its own checksum recomputed)."""
    record = json.loads(path.read_text())
    record["fingerprint"] = "0" * 32
    record[RECORD_SHA256] = record_checksum(record)
    path.write_text(json.dumps(record))


HIDDEN_CHUNK = "dense.zarr/hidden_0/c/0/0/0"
CORRUPTIONS = [
    # (id, file, damage, reader raises CorruptShardError naming the file)
    ("truncate-arrow", "tokens.arrow", _truncate, True),
    ("truncate-logp", "topk_logp.arrow", _truncate, True),
    ("flip-byte-arrow", "topk_ids.arrow", _flip_byte, True),
    ("delete-arrow", "topk_tail.arrow", lambda p: p.unlink(), True),
    ("truncate-zarr", HIDDEN_CHUNK, _truncate, True),
    ("flip-byte-zarr", HIDDEN_CHUNK, _flip_byte, True),
    ("delete-zarr", HIDDEN_CHUNK, lambda p: p.unlink(), True),
    ("delete-zarr-meta", "dense.zarr/hidden_0/zarr.json", lambda p: p.unlink(), True),
    ("stray-file", "notes.txt", lambda p: p.write_text("hello"), False),
    ("stray-dense-file", "dense.zarr/hidden_0/c/9", lambda p: p.write_bytes(b"\0" * 8), False),
    ("delete-commit", "COMMIT.json", lambda p: p.unlink(), False),
    ("garbage-commit", "COMMIT.json", lambda p: p.write_bytes(b"\x00garbage{"), False),
    ("list-commit", "COMMIT.json", lambda p: p.write_text("[1, 2]"), False),
    ("other-fingerprint", "COMMIT.json", _refingerprint, False),
]


@pytest.fixture
def three_shards(tmp_path, rows_for, provenance, spec_with):
    spec = spec_with(hidden=HiddenSpec(layers=(0,), width=8))
    writer = StoreWriter(tmp_path, spec, provenance)
    parts = {s: rows_for(spec, 4, first_id=10 * i, seed=i) for i, s in enumerate(("a", "b", "c"))}
    for shard_id, rows in parts.items():
        writer.write_shard(shard_id, rows)
    assert verify_store(str(tmp_path)).ok
    return tmp_path, writer, parts


@pytest.mark.parametrize(("file", "damage", "reader_names_it"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_found_named_and_repaired(three_shards, file, damage, reader_names_it):
    store, writer, parts = three_shards
    damage(store / "shards" / "b" / file)

    report = verify_store(str(store))
    assert not report.ok
    assert report.shards_checked == 3
    assert report.bad_shards == ["b"], report.problems  # a corrupt shard hides no other
    assert any(p.shard == "b" and p.file == file for p in report.problems), report.problems
    assert all(f"shard b, file {file}" in str(p) for p in report.problems if p.file == file)
    assert writer.committed("b") is None and writer.committed("a") is not None

    reader = StoreReader(store)
    if reader_names_it:
        with pytest.raises(CorruptShardError) as info:
            reader.read_shard("b")
        assert "shard b" in str(info.value) and file.split("/")[0] in str(info.value)
        if file.startswith("dense.zarr"):
            assert file in str(info.value) or "dense.zarr" in str(info.value)
    if file == "COMMIT.json" and damage is not _refingerprint:
        if "b" in reader.shard_ids():
            with pytest.raises(CorruptShardError, match="COMMIT.json"):
                reader.record("b")
    if damage is _refingerprint:
        with pytest.raises(FingerprintMismatchError, match="shard b"):
            reader.record("b")
    for other in ("a", "c"):  # the others read fine
        got = reader.read_shard(other, ["sample_id", "input_ids", "hidden_0"])
        np.testing.assert_array_equal(got["input_ids"], parts[other]["input_ids"])

    # writing the shard again repairs it; the corrupt one is moved aside, not deleted
    result = writer.write_shard("b", parts["b"])
    assert not result.skipped
    quarantined = [n for n in _shard_entries(store) if n.startswith(".corrupt-b-")]
    assert len(quarantined) == 1
    report = verify_store(str(store))
    assert report.ok, report.problems
    assert report.leftovers == (f"shards/{quarantined[0]}",)
    got = StoreReader(store).read_shard("b")
    np.testing.assert_array_equal(got["topk_ids"], parts["b"]["topk_ids"])
    np.testing.assert_array_equal(got["sample_id"], parts["b"]["sample_id"])


def test_size_check_misses_a_flipped_byte_but_hash_finds_it(three_shards):
    store, writer, _ = three_shards
    _flip_byte(store / "shards" / "c" / "tokens.arrow")
    assert verify_store(str(store), check="size").ok
    report = verify_store(str(store))
    assert [(p.shard, p.file) for p in report.problems] == [("c", "tokens.arrow")]


def test_duplicate_sample_ids_across_shards_are_reported(three_shards, rows_for):
    store, writer, parts = three_shards
    rows = dict(parts["c"], sample_id=np.array([11, 40, 41, 42]))  # 11 is also in shard b
    writer.write_shard("d", rows)
    report = verify_store(str(store))
    assert not report.ok
    assert any("sample_id 11" in p.message and p.shard in ("b", "d") for p in report.problems), report.problems


def test_verify_reports_uncommitted_shard_dir(three_shards):
    store, _, _ = three_shards
    (store / "shards" / "e").mkdir()
    (store / "shards" / "e" / "tokens.arrow").write_bytes(b"x")
    report = verify_store(str(store))
    assert [(p.shard, p.file) for p in report.problems] == [("e", "COMMIT.json")]
    assert StoreReader(store).shard_ids() == ["a", "b", "c"]


# ---------------------------------------------------------------- a writer killed mid-shard

KILLED_WRITER = textwrap.dedent(
    """
    import importlib.util, json, sys
    conftest, url, n_shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loader = importlib.util.spec_from_file_location("kdstore_test_rows", conftest)
    rows_mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(rows_mod)
    from kdstore.spec import HiddenSpec, StoreSpec, TopKSpec
    from kdstore.writer import StoreWriter

    R = 8  # big enough (1 MB of hidden states at zstd 19) that a kill lands mid-shard
    spec = StoreSpec(vocab_size=256, row_length=64, shard_rows=R, topk=TopKSpec(k=4),
                     hidden=HiddenSpec(layers=(0, 1), width=512), zstd_level=19, record_batch_rows=4)
    writer = StoreWriter(url, spec, rows_mod.PROVENANCE)
    base = rows_mod.make_rows(spec, R, seed=0)
    for i in range(n_shards):
        rows = dict(base, sample_id=base["sample_id"] + i * R)
        result = writer.write_shard(f"shard-{i:03d}", rows)
        print(json.dumps({"shard": f"shard-{i:03d}", "skipped": result.skipped}), flush=True)
    """
)
N_KILL_SHARDS = 5


def _committed(store: Path) -> list[str]:
    return [n for n in _shard_entries(store) if not n.startswith(".") and (store / "shards" / n / "COMMIT.json").exists()]


def _staging(store: Path) -> list[str]:
    return [n for n in _shard_entries(store) if n.startswith(".tmp-")]


def test_writer_killed_mid_shard(tmp_path, conftest_path, provenance):
    store = tmp_path / "store"
    argv = [sys.executable, "-c", KILLED_WRITER, conftest_path, str(store), str(N_KILL_SHARDS)]
    leftovers: list[str] = []
    for _attempt in range(5):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if len(_committed(store)) >= 2 and _staging(store):
                    break
                time.sleep(0.005)
            assert proc.poll() is None, f"writer ended before it could be killed: {proc.communicate()}"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(30)  # reap it: a zombie still answers kill(pid, 0)
        assert proc.returncode == -signal.SIGKILL
        leftovers = _staging(store)
        if leftovers:
            break  # killed mid-shard, as wanted (otherwise it died between shards: again)
    assert leftovers, "the writer was never killed mid-shard"
    assert len(leftovers) == 1 and f"@{proc.pid}@" in leftovers[0]
    committed = _committed(store)
    assert 2 <= len(committed) < N_KILL_SHARDS
    before = {s: _digest_tree(store / "shards" / s) for s in committed}

    # the store opens, every visible shard verifies and reads, the leftover is reported
    reader = StoreReader(store)
    assert reader.shard_ids() == committed
    for shard_id in committed:
        assert len(reader.read_shard(shard_id, ["sample_id", "hidden_1"])["sample_id"]) == 8
    report = verify_store(str(store))
    assert report.ok, report.problems
    assert report.shards_checked == len(committed)
    assert report.leftovers == (f"shards/{leftovers[0]}",)

    # cleanup removes the dead writer's staging dir (and only that)
    spec = StoreReader(store).spec
    removed = StoreWriter(store, spec, provenance).cleanup_stale()
    assert removed == leftovers
    assert _staging(store) == [] and _committed(store) == committed

    # the same job, run again, completes every shard and rewrites none of the committed ones
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = {r["shard"]: r["skipped"] for r in map(json.loads, done.stdout.splitlines())}
    assert results == {f"shard-{i:03d}": f"shard-{i:03d}" in committed for i in range(N_KILL_SHARDS)}
    assert {s: _digest_tree(store / "shards" / s) for s in committed} == before
    report = verify_store(str(store))
    assert report.ok and report.leftovers == () and report.shards_checked == N_KILL_SHARDS
    reader = StoreReader(store)
    ids = np.concatenate([reader.read_shard(s, ["sample_id"])["sample_id"] for s in reader.shard_ids()])
    assert sorted(ids.tolist()) == list(range(8 * N_KILL_SHARDS))  # each exactly once


def test_cleanup_stale_keeps_live_writers_and_removes_old_dirs(tmp_path, provenance, spec_with):
    writer = StoreWriter(tmp_path, spec_with(), provenance)
    shards = tmp_path / "shards"
    live = shards / f".tmp-x@{socket.gethostname()}@{os.getpid()}@abcd1234"
    other_host = shards / ".tmp-y@another-host@1@abcd1234"
    old = shards / ".tmp-z@another-host@2@abcd1234"
    for d in (live, other_host, old):
        d.mkdir(parents=True)
        (d / "tokens.arrow").write_bytes(b"partial")
    long_ago = time.time() - 7 * 3600
    os.utime(old, (long_ago, long_ago))
    assert writer.cleanup_stale() == [old.name]
    assert live.exists() and other_host.exists()
    assert sorted(writer.cleanup_stale(max_age_s=0)) == sorted([live.name, other_host.name])
    shutil.rmtree(shards)


# ---------------------------------------------------------------- specs

BASE = {"vocab_size": 1000, "row_length": 8, "shard_rows": 4}


def test_spec_dict_round_trip_keeps_the_fingerprint(spec_with, provenance):
    spec = spec_with()
    again = StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert fingerprint(again, provenance) == fingerprint(spec, provenance)
    assert Provenance.from_dict(json.loads(json.dumps(provenance.to_dict()))) == provenance
    # equal values give equal fingerprints whatever their Python type
    same = StoreSpec(
        vocab_size=np.int64(256), row_length=8, shard_rows=4, topk=TopKSpec(k=np.int32(5), temperature=1),
        sampled=spec.sampled, hidden=HiddenSpec(layers=[0, np.int64(2)], width=16), attention=spec.attention,
        record_batch_rows=3, text=True,
    )  # fmt: skip
    assert fingerprint(same, provenance) == fingerprint(spec, provenance)


def test_draw_scheme_keeps_older_fingerprints_and_round_trips(provenance):
    multinomial = StoreSpec.from_dict({**BASE, "topk": {"k": 4}, "sampled": {"n_draws": 4}, "tail_sample": {"n_draws": 2}})
    assert "scheme" not in multinomial.to_dict()["sampled"] and "scheme" not in multinomial.to_dict()["tail_sample"]
    systematic = StoreSpec.from_dict({**BASE, "topk": {"k": 4}, "sampled": {"n_draws": 4, "scheme": "systematic"},
                                      "tail_sample": {"n_draws": 2}})
    assert systematic.sampled.scheme == "systematic"
    assert StoreSpec.from_dict(json.loads(json.dumps(systematic.to_dict()))) == systematic
    assert fingerprint(systematic, provenance) != fingerprint(multinomial, provenance)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({**BASE, "vocab": 3}, "vocab"),
        ({**BASE, "topk": {"k": 4, "kk": 2}}, "kk"),
        ({**BASE, "sampled": {"n_draws": 4, "temprature": 1.0}}, "temprature"),
        ({**BASE, "hidden": {"layers": [1], "width": 8, "dtpye": "int8"}}, "dtpye"),
        ({**BASE, "attention": {"layers": [1], "heads": [0], "top_k": 2}}, "top_k"),
    ],
)
def test_spec_unknown_key_is_named(data, named):
    with pytest.raises(SpecError) as info:
        StoreSpec.from_dict(data)
    assert repr(named) in str(info.value)
    nested = [k for k in ("topk", "sampled", "hidden", "attention") if k in data]
    if nested:
        assert f"spec.{nested[0]}" in str(info.value)


def test_provenance_unknown_key_is_named():
    with pytest.raises(SpecError, match="'model'"):
        Provenance.from_dict({"teacher": {}, "model": {}})


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({**BASE, "vocab_size": 1}, "vocab_size"),
        ({**BASE, "row_length": 0}, "row_length"),
        ({**BASE, "shard_rows": -1}, "shard_rows"),
        ({**BASE, "zstd_level": 30}, "zstd_level"),
        ({**BASE, "record_batch_rows": 0}, "record_batch_rows"),
        ({**BASE, "vocab_size": "1000"}, "vocab_size"),
        ({**BASE, "shard_rows": 2.5}, "shard_rows"),
        ({**BASE, "topk": {"k": 0}}, "topk.k"),
        ({**BASE, "topk": {"k": "4"}}, "topk.k"),
        ({**BASE, "topk": {"k": True}}, "topk.k"),
        ({**BASE, "topk": {}}, "k"),
        ({**BASE, "topk": 4}, "topk"),
        ({**BASE, "topk": {"k": 4, "sampler": "nucleus"}}, "sampler"),
        ({**BASE, "topk": {"k": 4, "sampler": "topp_k"}}, "top_p"),
        ({**BASE, "topk": {"k": 4, "sampler": "topp_k", "top_p": 1.5}}, "top_p"),
        ({**BASE, "topk": {"k": 4, "logp_step": 2}}, "logp_step"),
        ({**BASE, "topk": {"k": 4, "temperature": 0}}, "temperature"),
        ({**BASE, "topk": {"k": 4, "temperature": "hot"}}, "temperature"),
        ({**BASE, "sampled": {"n_draws": 0}}, "n_draws"),
        ({**BASE, "sampled": {"n_draws": 256}}, "n_draws"),
        ({**BASE, "sampled": {"n_draws": 4, "scheme": "stratified"}}, "sampled.scheme"),
        ({**BASE, "topk": {"k": 4}, "tail_sample": {"n_draws": 4, "scheme": 1}}, "tail_sample.scheme"),
        ({**BASE, "hidden": {"layers": [], "width": 8}}, "hidden.layers"),
        ({**BASE, "hidden": {"layers": [1, 1], "width": 8}}, "duplicates"),
        ({**BASE, "hidden": {"layers": ["x"], "width": 8}}, "hidden.layers"),
        ({**BASE, "hidden": {"layers": 3, "width": 8}}, "hidden.layers"),
        ({**BASE, "hidden": {"layers": [1], "width": 8, "dtype": "float64"}}, "hidden.dtype"),
        ({**BASE, "attention": {"layers": [1], "heads": [0], "dtype": "float32"}}, "attention.dtype"),
        ({**BASE, "attention": {"layers": [1], "heads": [], "dtype": "uint8"}}, "attention"),
        ({**BASE, "attention": {"layers": [1], "heads": [0], "topk": 9}}, "attention.topk"),
        ({**BASE, "attention": {"layers": [1], "heads": [0], "topk": 0}}, "attention.topk"),
    ],
)
def test_spec_invalid_values(data, named):
    with pytest.raises(SpecError) as info:
        StoreSpec.from_dict(data)
    assert named in str(info.value)
