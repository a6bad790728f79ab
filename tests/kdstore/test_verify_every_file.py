"""verify covers every file of a store: store.json, teacher/ and each shard's files.

A store with every signal kind (top-k, draws, text, hidden states, attention) and teacher files
is altered in each of four ways (a byte flipped, the file truncated, a byte appended, the file
deleted), one file at a time, for every file it has; verify must find each alteration and name
the altered file. The flipped byte's position is drawn from a seeded generator per case.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kdstore.errors import CorruptShardError, NotAStoreError
from kdstore.reader import StoreReader
from kdstore.records import COMMIT_JSON_INDENT, CommitRecord, json_bytes
from kdstore.verify import verify_store
from kdstore.writer import StoreWriter

ALTERATIONS = ("flip", "truncate", "append", "delete")


def _alter(path, how: str, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    if how == "flip":
        at = int(rng.integers(len(data)))
        path.write_bytes(data[:at] + bytes([data[at] ^ (1 << int(rng.integers(8)))]) + data[at + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: int(rng.integers(len(data)))])
    elif how == "append":
        path.write_bytes(data + bytes([int(rng.integers(256))]))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, spec_with, rows_for, provenance):
    root = tmp_path_factory.mktemp("full") / "store"
    spec = spec_with()
    writer = StoreWriter(root, spec, provenance)
    for i, shard in enumerate(("s0", "s1")):
        writer.write_shard(shard, rows_for(spec, 4, first_id=10 * i, seed=i))
    head = np.random.default_rng(0).standard_normal((spec.vocab_size, 16)).astype(np.float16)
    writer.write_teacher_tensors("output_head", {"weight": head})
    writer.write_teacher_file("config.json", json.dumps({"hidden_size": 16}).encode())
    writer.write_teacher_file("tokenizer/tokenizer.json", b'{"version": "1.0"}')
    writer.write_teacher_file("teacher.json", b'{"name": "tiny"}')
    writer.commit_teacher()
    assert verify_store(str(root)).ok
    return root


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_the_store_has_every_kind_of_file(full_store):
    files = _files(full_store)
    assert "store.json" in files and "teacher/COMMIT.json" in files and "teacher/output_head.safetensors" in files
    for name in ("tokens.arrow", "topk_logp.arrow", "draws.arrow", "text.arrow", "COMMIT.json"):
        assert f"shards/s0/{name}" in files
    assert any(f.startswith("shards/s0/dense.zarr/hidden_") for f in files)
    assert any(f.startswith("shards/s0/dense.zarr/attn_") for f in files)


def test_every_alteration_of_every_file_is_named(full_store, tmp_path):
    files = _files(full_store)
    rng = np.random.default_rng(1234)
    missed = []
    for index, rel in enumerate(files):
        for how in ALTERATIONS:
            copy = tmp_path / f"c{index}-{how}"
            shutil.copytree(full_store, copy)
            _alter(copy / rel, how, rng)
            report = verify_store(str(copy))
            named = [str(p) for p in report.problems]
            shard, _, inside = rel.partition("/")[2].partition("/") if rel.startswith("shards/") else ("", "", "")
            hit = (any(f"shard {shard}, file {inside}" in n or f"file {inside}" in n and shard in n for n in named)
                   if shard else any(rel in n for n in named))
            if report.ok or not hit:
                missed.append((rel, how, named))
            shutil.rmtree(copy)
    assert not missed, missed[:5]
    assert len(files) * len(ALTERATIONS) >= 100  # the property held over that many cases


def test_cli_verify_exits_1_naming_a_teacher_file(full_store, tmp_path, capsys):
    from flows.cli import main

    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    head = copy / "teacher" / "output_head.safetensors"
    head.write_bytes(head.read_bytes()[:-7])
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "teacher/output_head.safetensors" in out and "bad file" in out


def test_cli_verify_names_a_teacher_record_that_is_not_an_object(full_store, tmp_path, capsys):
    from flows.cli import main

    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    (copy / "teacher" / "COMMIT.json").write_text("[1, 2]")
    assert main(["verify", str(copy)]) == 1
    captured = capsys.readouterr()
    assert "teacher/COMMIT.json" in captured.out and "Traceback" not in captured.out + captured.err


def test_reader_refuses_an_altered_teacher_head(full_store, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    head = copy / "teacher" / "output_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0x10
    head.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="output_head.safetensors"):
        StoreReader(str(copy)).read_teacher_tensors("output_head")


def test_store_json_codec_change_and_fingerprint_are_checked(full_store, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    meta = json.loads((copy / "store.json").read_text())
    meta["spec"]["zstd_level"] = meta["spec"]["zstd_level"] + 1  # a changed codec step, old fingerprint kept
    (copy / "store.json").write_text(json.dumps(meta, indent=2))
    report = verify_store(str(copy))
    assert any(p.file == "store.json" and "fingerprint" in p.message for p in report.problems), report.problems


def test_a_stray_file_is_named_and_an_empty_folder_is_not_a_store(full_store, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    (copy / "notes.txt").write_text("hello")
    report = verify_store(str(copy))
    assert [p.file for p in report.problems] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="no kdcache store"):
        verify_store(str(tmp_path / "empty"))


# ---------------------------------------------------------------- the read paths

def _every_case_in_one_store(full_store, root) -> tuple[dict[str, str], list[int]]:
    """A copy of the store holding, besides its clean shards, one copy of shard s0 per (file,
    alteration) with that alteration applied: {altered shard: altered file}, and the sample ids
    of the clean shards (the altered copies share s0's ids: a row of one that came out would
    show as a second copy of an id)."""
    shutil.copytree(full_store, root)
    rng = np.random.default_rng(99)
    files = sorted(p.relative_to(root / "shards" / "s0").as_posix() for p in (root / "shards" / "s0").rglob("*")
                   if p.is_file() and p.name != "COMMIT.json")
    altered = {}
    for j, rel in enumerate(files):
        for how in ALTERATIONS:
            shard = f"x{j:02d}{how}"
            shutil.copytree(root / "shards" / "s0", root / "shards" / shard)
            record = json.loads((root / "shards" / shard / "COMMIT.json").read_text())
            record["shard_id"] = shard
            (root / "shards" / shard / "COMMIT.json").write_bytes(
                json_bytes(CommitRecord.from_json({k: v for k, v in record.items() if k != "record_sha256"}).to_json(),
                           COMMIT_JSON_INDENT))
            _alter(root / "shards" / shard / rel, how, rng)
            altered[shard] = rel
    reader = StoreReader(str(root))
    clean = sorted(int(x) for s in ("s0", "s1") for x in reader.read_shard(s, ["sample_id"])["sample_id"])
    return altered, clean


@pytest.fixture(scope="module")
def every_case(full_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("every_case") / "store"
    altered, clean = _every_case_in_one_store(full_store, root)
    return root, altered, clean


def _check_skipped(skipped: dict[str, str], altered: dict[str, str]) -> None:
    assert set(skipped) == set(altered), sorted(set(altered) ^ set(skipped))
    unnamed = {s: why for s, why in skipped.items() if f"shard {s}, file {altered[s]}" not in why}
    assert not unnamed, list(unnamed.items())[:3]


def test_kdstream_with_workers_catches_every_alteration_before_a_batch(every_case):
    import warnings

    from kdstore.digest import forget_all
    from kdstore.torch_stream import KDLoader, KDStream

    root, altered, clean = every_case
    forget_all()
    reader = StoreReader(str(root))
    stream = KDStream(reader, reader.field_names, 4, on_corrupt="skip", rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = [int(i) for batch in KDLoader(stream, num_workers=2) for i in batch["sample_id"]]
    assert len(altered) >= 50 and sorted(seen) == clean  # no row of an altered shard came out
    _check_skipped(stream.skipped, altered)


def test_store_rows_catch_every_alteration(every_case):
    import warnings

    from kdstore.digest import forget_all
    from pipeline.train.hf_trainer import StoreRows

    root, altered, clean = every_case
    forget_all()
    rows = StoreRows(str(root), StoreReader(str(root)).field_names, on_corrupt="skip", block_rows=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = [int(row["sample_id"]) for row in rows]
    assert sorted(seen) == clean
    _check_skipped(rows.stream.skipped, altered)
    with pytest.raises(CorruptShardError, match=r"store '.*', shard x\d\d\w+, file "):
        list(StoreRows(str(root), ["topk_ids"], block_rows=4))  # the default stops at the first


def test_every_alteration_of_a_commit_record_is_caught_before_training(full_store, tmp_path):
    from kdstore.verify import check_structure

    rng = np.random.default_rng(5)
    for how in ALTERATIONS:
        copy = tmp_path / how
        shutil.copytree(full_store, copy)
        _alter(copy / "shards" / "s0" / "COMMIT.json", how, rng)
        report = check_structure(str(copy))
        assert [(p.shard, p.file) for p in report.problems] == [("s0", "COMMIT.json")], (how, report.problems)


def test_the_structural_check_reads_no_payload(full_store, tmp_path):
    """An altered payload byte passes the check before training (it is caught when read); a
    shard folder without its commit record does not."""
    from kdstore.verify import check_structure

    copy = tmp_path / "s"
    shutil.copytree(full_store, copy)
    assert check_structure(str(copy)).ok and check_structure(str(copy)).shards_checked == 2
    _alter(copy / "shards" / "s1" / "topk_ids.arrow", "flip", np.random.default_rng(0))
    assert check_structure(str(copy)).ok
    with pytest.raises(CorruptShardError, match="shard s1, file topk_ids.arrow"):
        StoreReader(str(copy)).read_shard("s1", ["topk_ids"])
    (copy / "shards" / "s0" / "COMMIT.json").unlink()
    report = check_structure(str(copy))
    assert [(p.shard, p.file) for p in report.problems] == [("s0", "COMMIT.json")]
