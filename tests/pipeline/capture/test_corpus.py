from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.capture.corpus import (
    BUILTIN_PATH,
    CorpusError,
    CorpusSource,
    corpus_digest,
    list_corpus_files,
    read_documents,
)
from pipeline.capture.packing import (
    PackedRows,
    in_split,
    is_test,
    is_validation,
    iter_packed,
    pack_corpus_file,
    pack_file,
    sample_ids,
    split_text,
)

KEY = hashlib.sha256(b"some file").hexdigest()


def _files(*paths: Path, **kw) -> CorpusSource:
    return CorpusSource(kind="files", paths=tuple(str(p) for p in paths), **kw)


def _docs_of(rows: PackedRows, eos: int) -> list[list[int]]:
    """Valid tokens of all rows, concatenated and split at eos."""
    flat = rows.input_ids[rows.valid].tolist()
    assert flat[-1] == eos
    out, cur = [], []
    for t in flat:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


@pytest.fixture(scope="module")
def builtin_docs() -> list[str]:
    (file,) = list_corpus_files(CorpusSource())
    return list(read_documents(file, CorpusSource()))


def test_builtin_corpus(builtin_docs: list[str]) -> None:
    files = list_corpus_files(CorpusSource(kind="builtin"))
    assert len(files) == 1 and files[0].path == BUILTIN_PATH and files[0].format == "builtin"
    assert files == list_corpus_files(CorpusSource())
    assert len(builtin_docs) == 79
    from pydoc_data.topics import topics

    assert builtin_docs[0] == topics[sorted(topics)[0]]


def test_pack_round_trip(builtin_docs: list[str], smollm2_tokenizer) -> None:
    tok, T = smollm2_tokenizer, 128
    eos = tok.eos_token_id
    rows = pack_file(builtin_docs, tok, T, KEY)
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in builtin_docs)
    assert rows.input_ids.shape == rows.doc_ids.shape == rows.valid.shape == (-(-n_tokens // T), T)
    assert rows.input_ids.dtype == np.int32 and rows.doc_ids.dtype == np.int32
    assert rows.valid.dtype == bool and rows.sample_ids.dtype == np.uint64
    assert rows.tokens == n_tokens == int(rows.valid.sum())
    assert (rows.docs, rows.empty_docs, rows.held_out_docs) == (79, 0, 0)
    assert rows.valid[:-1].all()  # only the last row is padded
    pad = ~rows.valid
    assert (rows.input_ids[pad] == eos).all() and (rows.doc_ids[pad] == -1).all()
    expected = [tok(d, add_special_tokens=False)["input_ids"] for d in builtin_docs]
    assert _docs_of(rows, eos) == expected
    # doc_ids mark the same boundaries: document i spans its tokens plus its eos.
    valid_docs = rows.doc_ids[rows.valid]
    assert valid_docs.tolist() == [i for i, e in enumerate(expected) for _ in range(len(e) + 1)]


def test_pack_is_deterministic_and_chunks_agree(builtin_docs: list[str], smollm2_tokenizer) -> None:
    a = pack_file(builtin_docs, smollm2_tokenizer, 256, KEY, batch_docs=7)
    b = pack_file(builtin_docs, smollm2_tokenizer, 256, KEY)
    for field in ("input_ids", "doc_ids", "valid", "sample_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    chunks = list(iter_packed(builtin_docs, smollm2_tokenizer, 256, KEY, rows_per_chunk=50,
                              batch_docs=16))
    assert [c.num_rows for c in chunks[:-1]] == [50] * (len(chunks) - 1)
    np.testing.assert_array_equal(np.concatenate([c.input_ids for c in chunks]), a.input_ids)
    np.testing.assert_array_equal(np.concatenate([c.sample_ids for c in chunks]), a.sample_ids)
    np.testing.assert_array_equal(np.concatenate([c.valid for c in chunks]), a.valid)
    for stat in ("docs", "tokens", "long_docs", "empty_docs"):
        assert sum(getattr(c, stat) for c in chunks) == getattr(a, stat)


def test_sample_ids_stable_and_distinct_across_files(tmp_path: Path, smollm2_tokenizer) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"Document number {i}. " * 200)
    source = _files(tmp_path)
    files = list_corpus_files(source)
    assert [Path(f.path).name for f in files] == ["f0.txt", "f1.txt", "f2.txt"]
    runs = [[pack_corpus_file(f, source, smollm2_tokenizer, 64).sample_ids for f in files]
            for _ in range(2)]
    for x, y in zip(*runs, strict=True):
        np.testing.assert_array_equal(x, y)
    ids = np.concatenate(runs[0])
    assert len(np.unique(ids)) == len(ids) and ids.max() < 2**63
    sha = files[1].sha256
    expected = ((int(sha[:10], 16) >> 1) << 24) + np.arange(len(runs[0][1]))
    np.testing.assert_array_equal(runs[0][1], expected.astype(np.uint64))
    # Validation rows of the same file live in another id range.
    assert not set(sample_ids(sha, 0, 5, "validation")) & set(sample_ids(sha, 0, 5, "train"))


def test_changing_one_file_changes_only_its_key(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    before = list_corpus_files(_files(tmp_path))
    (tmp_path / "b.txt").write_text("edited\n")
    after = list_corpus_files(_files(tmp_path))
    assert before[0] == after[0] and before[1].sha256 != after[1].sha256
    assert before[1].sha256 == hashlib.sha256(b"text of b.txt\n").hexdigest()
    assert corpus_digest(before) != corpus_digest(after)


def test_long_document_split_and_counted(smollm2_tokenizer) -> None:
    long = "word " * 100
    rows = pack_file(["short one", long, "short two"], smollm2_tokenizer, 16, KEY)
    assert rows.long_docs == 1 and rows.docs == 3
    spanned = {r for r in range(rows.num_rows) if (rows.doc_ids[r] == 1).any()}
    assert len(spanned) >= 6
    assert _docs_of(rows, smollm2_tokenizer.eos_token_id)[1] == \
        smollm2_tokenizer(long, add_special_tokens=False)["input_ids"]


def test_empty_documents_skipped_and_counted(tmp_path: Path, smollm2_tokenizer) -> None:
    path = tmp_path / "c.jsonl"
    lines = [{"text": "first"}, {"text": ""}, {"text": "  \n "}, {"text": None}, {"text": "last"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    source = _files(path)
    (file,) = list_corpus_files(source)
    rows = pack_corpus_file(file, source, smollm2_tokenizer, 32)
    assert (rows.docs, rows.empty_docs) == (2, 3)
    assert sorted(set(rows.doc_ids[rows.valid].tolist())) == [0, 4]  # indices in the file


def test_special_token_text_is_plain_text(smollm2_tokenizer) -> None:
    eos = smollm2_tokenizer.eos_token_id
    rows = pack_file(["a <|im_end|> b", "c"], smollm2_tokenizer, 64, KEY)
    assert int((rows.input_ids[rows.valid] == eos).sum()) == 2  # one per document only


def test_non_utf8_error_names_file_and_offset(tmp_path: Path, smollm2_tokenizer) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\n\nw\xe9rld\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: not valid UTF-8 at byte offset 8"):
        list_corpus_files(_files(bad))
    lenient = _files(bad, errors="replace", text_split="blank_line")
    (file,) = list_corpus_files(lenient)
    assert list(read_documents(file, lenient)) == ["hello", "w\ufffdrld"]
    # Reading (not only listing) reports the same offset, also line by line.
    for split in ("file", "blank_line"):
        strict = _files(bad, text_split=split)
        with pytest.raises(CorpusError, match="byte offset 8"):
            list(read_documents(file, strict))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: not valid UTF-8 at byte offset 28"):
        list_corpus_files(_files(jsonl))
    (jfile,) = list_corpus_files(_files(jsonl, errors="replace"))
    with pytest.raises(CorpusError, match=r"bad\.jsonl line 2: not valid UTF-8 at byte offset 28"):
        list(read_documents(jfile, _files(jsonl)))
    assert list(read_documents(jfile, _files(jsonl, errors="replace"))) == ["ok", "caf\ufffd"]


def test_utf8_check_across_block_boundaries(tmp_path: Path) -> None:
    mib = 1 << 20
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"a" * (mib - 1) + "é".encode() + b"tail")  # é straddles the 1 MiB block
    list_corpus_files(_files(ok))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a" * (2 * mib + 5) + b"\xff")
    with pytest.raises(CorpusError, match=f"byte offset {2 * mib + 5}"):
        list_corpus_files(_files(bad))
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(b"abc" + "é".encode()[:1])
    with pytest.raises(CorpusError, match="byte offset 3"):
        list_corpus_files(_files(truncated))


def test_txt_splitting_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffpara one\nline two\n\n\n   \npara two\r\n".encode())
    (file,) = list_corpus_files(_files(path))
    assert list(read_documents(file, _files(path))) == [
        "para one\nline two\n\n\n   \npara two\r\n"]
    assert list(read_documents(file, _files(path, text_split="blank_line"))) == [
        "para one\nline two", "para two"]


def test_jsonl_and_parquet_with_text_field(tmp_path: Path, smollm2_tokenizer) -> None:
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "body": texts}), parquet, row_group_size=2)
    source = _files(tmp_path, text_field="body")
    files = list_corpus_files(source)
    assert [f.format for f in files] == ["jsonl", "parquet"]
    for f in files:
        assert list(read_documents(f, source)) == texts
    a, b = (pack_corpus_file(f, source, smollm2_tokenizer, 8) for f in files)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not set(a.sample_ids) & set(b.sample_ids)
    # Binary parquet columns are decoded (strictly by default).
    raw = tmp_path / "raw" / "b.parquet"
    raw.parent.mkdir()
    pq.write_table(pa.table({"text": pa.array([b"ok", b"x\xffy"], pa.binary())}), raw)
    (rfile,) = list_corpus_files(_files(raw))
    with pytest.raises(CorpusError, match=r"b\.parquet row 1 .*byte offset 1"):
        list(read_documents(rfile, _files(raw)))
    assert list(read_documents(rfile, _files(raw, errors="replace"))) == ["ok", "x\ufffdy"]


def test_missing_text_field_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n{"body": "b"}\n')
    (file,) = list_corpus_files(_files(jsonl))
    with pytest.raises(CorpusError, match=r"d\.jsonl line 2: no field 'text' \(fields: \['body'\]\)"):
        list(read_documents(file, _files(jsonl)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a"]}), parquet)
    (file,) = list_corpus_files(_files(parquet))
    with pytest.raises(CorpusError, match=r"d\.parquet: no column 'text'"):
        list(read_documents(file, _files(parquet)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    (file,) = list_corpus_files(_files(broken))
    with pytest.raises(CorpusError, match=r"broken\.jsonl line 2: invalid JSON"):
        list(read_documents(file, _files(broken)))


def test_missing_and_empty_inputs(tmp_path: Path, smollm2_tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list_corpus_files(_files(tmp_path / "nope.txt"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("not a corpus file")
    with pytest.raises(CorpusError, match="empty corpus"):
        list_corpus_files(_files(empty_dir))
    zero = tmp_path / "zero.txt"
    zero.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"zero\.txt: empty file"):
        list_corpus_files(_files(zero))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": " "}\n{"text": ""}\n')
    source = _files(blank)
    (file,) = list_corpus_files(source)
    with pytest.raises(CorpusError, match=r"blank\.jsonl: no documents \(2 empty"):
        pack_corpus_file(file, source, smollm2_tokenizer, 16)
    with pytest.raises(CorpusError, match="unsupported"):
        list_corpus_files(_files(empty_dir / "notes.md"))
    with pytest.raises(ValueError, match="needs at least one path"):
        CorpusSource(kind="files")


def test_three_splits_halve_the_held_out_text_and_leave_train_alone(builtin_docs: list[str], smollm2_tokenizer) -> None:
    kw = dict(val_fraction=0.25, seed=7)
    packed = {s: pack_file(builtin_docs, smollm2_tokenizer, 128, KEY, split=s, **kw)
              for s in ("train", "validation", "test", "held_out")}
    held = [d for d in builtin_docs if is_validation(d, **kw)]
    # train: the documents not held out, packed and numbered as if no test split existed
    alone = pack_file([d for d in builtin_docs if d not in held], smollm2_tokenizer, 128, KEY)
    np.testing.assert_array_equal(packed["train"].input_ids, alone.input_ids)
    np.testing.assert_array_equal(packed["train"].sample_ids, sample_ids(KEY, 0, alone.num_rows, "train"))
    assert set(packed["held_out"].doc_ids[packed["held_out"].valid]) == {builtin_docs.index(d) for d in held}
    # validation and test: every held-out document's blank-line blocks, each on exactly one side
    blocks = {b for d in held for b in re.split(r"\n[ \t]*\n", d) if b.strip()}
    val = {b for d in held for b in (split_text(d, "validation", **kw) or "").split("\n\n") if b}
    test = {b for d in held for b in (split_text(d, "test", **kw) or "").split("\n\n") if b}
    assert val and test and not val & test and val | test == blocks
    assert all(is_test(b, seed=7) for b in test) and not any(is_test(b, seed=7) for b in val)
    assert all(split_text(d, s, **kw) is None for d in builtin_docs if d not in held for s in ("validation", "test"))
    tokens = {s: int(packed[s].valid.sum()) for s in packed}
    assert 0.25 < tokens["test"] / (tokens["validation"] + tokens["test"]) < 0.75
    for s in ("validation", "test"):  # held-out ids: the split bit set, never a train id
        assert not set(packed[s].sample_ids) & set(packed["train"].sample_ids)
        assert set(packed[s].doc_ids[packed[s].valid]) <= set(packed["held_out"].doc_ids[packed["held_out"].valid])
    # whole documents (a conversation's key) go to one side
    sides = [[in_split(d, s, **kw) for s in ("train", "validation", "test")] for d in builtin_docs]
    assert all(sum(side) == 1 for side in sides)
    assert [side[1] or side[2] for side in sides] == [in_split(d, "held_out", **kw) for d in builtin_docs]
    with pytest.raises(ValueError, match="split='heldout'"):
        pack_file(builtin_docs, smollm2_tokenizer, 128, KEY, split="heldout", **kw)


def test_duplicate_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("same\n")
    (tmp_path / "b.txt").write_text("same\n")
    with pytest.warns(UserWarning, match=r"b\.txt has the same content as .*a\.txt"):
        files = list_corpus_files(_files(tmp_path, tmp_path / "a.txt"))
    assert [Path(f.path).name for f in files] == ["a.txt"]


def test_held_out_split(builtin_docs: list[str], smollm2_tokenizer) -> None:
    kw = dict(val_fraction=0.25, seed=7)
    train = pack_file(builtin_docs, smollm2_tokenizer, 128, KEY, split="train", **kw)
    val = pack_file(builtin_docs, smollm2_tokenizer, 128, KEY, split="held_out", **kw)
    train_docs = set(train.doc_ids[train.valid].tolist())
    val_docs = set(val.doc_ids[val.valid].tolist())
    assert not train_docs & val_docs and train_docs | val_docs == set(range(79))
    assert 8 <= len(val_docs) <= 35
    assert (train.docs, train.held_out_docs) == (len(train_docs), len(val_docs))
    assert not set(train.sample_ids) & set(val.sample_ids)
    again = pack_file(builtin_docs, smollm2_tokenizer, 128, KEY, split="held_out", **kw)
    np.testing.assert_array_equal(again.input_ids, val.input_ids)
    # Content, not position, decides: reversing the documents keeps each one's side.
    rev = pack_file(builtin_docs[::-1], smollm2_tokenizer, 128, KEY, split="held_out", **kw)
    assert {78 - i for i in rev.doc_ids[rev.valid].tolist()} == val_docs
    assert is_validation("x", 1.0) and not is_validation("x", 0.0)
    picks = [is_validation(d, 0.25, seed=1) for d in builtin_docs]
    assert picks == [is_validation(d, 0.25, seed=1) for d in builtin_docs]
    assert picks != [is_validation(d, 0.25, seed=2) for d in builtin_docs]
    with pytest.raises(ValueError, match="val_fraction"):
        is_validation("x", 1.5)


def test_hub_source_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError, match=r"'kdcache-test/no-such-dataset'.*offline"):
        list_corpus_files(CorpusSource(kind="hub", name="kdcache-test/no-such-dataset"))
