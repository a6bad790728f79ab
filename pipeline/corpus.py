"""Corpus → fixed-length token rows with stable ids.

The teacher pass and every student must see exactly the same rows on any machine and after any
re-run, or cached signals would be attached to the wrong tokens. So a corpus is planned **per
file**, each keyed by the sha256 of its bytes; a file's documents are tokenised with the
teacher's tokenizer, joined as ``doc + [eos]`` and cut into rows of ``row_length`` tokens; a
row's ``sample_id`` depends only on its file's key, its split and its row index. Editing one
file changes only that file's key and rows.

Choices:
- ``.txt``: one document per file, or per block of non-blank lines (``text_split="blank_line"``).
  ``.jsonl``: one per line, the string at ``text_field``; ``.parquet``: one per row of that
  column. Read streaming with stdlib ``json`` and ``pyarrow``, not ``datasets`` (errors then
  name line and byte offset; a missing field is an error, not a silent null); ``datasets``
  serves hub datasets only. A leading BOM is dropped; documents are otherwise unaltered.
- Empty/whitespace-only documents (and null text) are skipped and counted (``empty_docs``); a
  file with no non-empty document is an error.
- The last row is padded with ``eos`` marked ``valid=False`` (no text is lost); padding has
  ``doc_ids == -1``. ``doc_ids`` number every document read from the file (empty and
  other-split ones included), so they point back into the file.
- Special-token text inside a document (a literal ``<|im_end|>``) is tokenised as text:
  ``eos`` appears only between documents.
- The train/validation split is by document, from a hash of its text and a seed
  (:func:`is_validation`): stable under reordering, and duplicates land on the same side.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.row_text import join_rows, offsets_of, piece_ends

Split = Literal["train", "validation"]
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
BUILTIN_PATH = "builtin:pydoc_data.topics"
# sample_id = key39 << 24 | is_validation << 23 | row: 39 bits of the file digest, one split bit
# and 23 bits of row index (at most 8,388,608 rows per file and split), 63 bits in all so the
# id also fits a signed int64. Files of one corpus are checked to differ in their 39 bits.
ROW_BITS = 23
MAX_ROWS_PER_FILE = 1 << ROW_BITS
_BLOCK = 1 << 20


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and where in it."""


@dataclass(frozen=True)
class CorpusSource:
    """Where documents come from. ``kind``: "builtin" (pydoc topics), "files" (``paths``:
    files or folders searched recursively for .txt/.jsonl/.parquet) or "hub" (``name``,
    ``config``, ``hub_split``, ``revision``; online only)."""

    kind: Literal["builtin", "files", "hub"] = "builtin"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    text_split: Literal["file", "blank_line"] = "file"
    errors: Literal["strict", "replace"] = "strict"
    name: str | None = None
    config: str | None = None
    hub_split: str = "train"
    revision: str | None = None

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str | os.PathLike) else self.paths
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        for key, value, allowed in [("kind", self.kind, ("builtin", "files", "hub")),
                                    ("text_split", self.text_split, ("file", "blank_line")),
                                    ("errors", self.errors, ("strict", "replace"))]:
            if value not in allowed:
                raise ValueError(f"corpus {key}={value!r}: expected one of {allowed}")
        if self.kind == "files" and not self.paths:
            raise ValueError("corpus kind='files' needs at least one path")
        if self.kind == "hub" and not self.name:
            raise ValueError("corpus kind='hub' needs a dataset name")


@dataclass(frozen=True)
class CorpusFile:
    """One unit of planning. ``sha256`` is the file's key (of its bytes; for builtin, of the
    canonical JSON of its sorted topics; for hub, of name, config, split and commit)."""

    path: str
    sha256: str
    bytes: int
    format: Literal["txt", "jsonl", "parquet", "builtin", "hub"]


@dataclass(frozen=True, eq=False)
class PackedRows:
    """Rows of one file (or one chunk of it). Counts cover the documents read for these rows."""

    input_ids: np.ndarray  # [N, T] int32, padding = eos
    doc_ids: np.ndarray  # [N, T] int32, index of the document in its file; -1 = padding
    valid: np.ndarray  # [N, T] bool, False on padding
    sample_ids: np.ndarray  # [N] uint64, see sample_ids()
    file_key: str
    split: Split | None
    docs: int = 0  # documents packed
    empty_docs: int = 0  # empty / whitespace-only documents skipped
    long_docs: int = 0  # documents (+ eos) longer than one row, hence split across rows
    held_out_docs: int = 0  # non-empty documents that belong to the other split
    tokens: int = 0  # valid tokens, one eos per document included
    text: np.ndarray | None = None  # [N] str, with_text only: the row's text (pipeline.row_text)
    char_end: np.ndarray | None = None  # [N, T] int32, with_text only: each token's end in it

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


# ----------------------------------------------------------------------------- planning


def _builtin_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _key39(sha256: str) -> int:
    return int(sha256[:10], 16) >> 1


def _digest_file(path: Path, check_utf8: bool) -> tuple[str, int]:
    """sha256 and size of a file; with ``check_utf8`` also fail on the first invalid byte."""
    h = hashlib.sha256()
    dec = codecs.getincrementaldecoder("utf-8")() if check_utf8 else None
    pos = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            h.update(block)
            if dec is not None:
                pending = len(dec.getstate()[0])  # bytes of a character cut by the last block
                try:
                    dec.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise _utf8_error(path, pos - pending + e.start) from None
            if not block:
                return h.hexdigest(), pos
            pos += len(block)


def _utf8_error(where: Any, offset: int) -> CorpusError:
    return CorpusError(f"{where}: not valid UTF-8 at byte offset {offset}; "
                       f"fix the file or set errors='replace'")


def _expand(paths: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus path does not exist: {p}")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and f.suffix.lower() in SUPPORTED_SUFFIXES and not f.name.startswith("."))
        elif p.suffix.lower() in SUPPORTED_SUFFIXES:
            out.append(p)
        else:
            raise CorpusError(f"{p}: unsupported corpus file type; expected {SUPPORTED_SUFFIXES}")
    return list(dict.fromkeys(out))


def list_corpus_files(source: CorpusSource) -> list[CorpusFile]:
    """The files of a corpus in a fixed order, each keyed by its content digest.

    Files are checked here, before any teacher work: missing paths, empty files, invalid UTF-8
    (.txt/.jsonl with ``errors="strict"``). A file with the same bytes as an earlier one is
    skipped with a warning (it would only repeat rows).
    """
    if source.kind == "builtin":
        topics = sorted(_builtin_topics().items())
        raw = json.dumps(topics, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return [CorpusFile(BUILTIN_PATH, hashlib.sha256(raw).hexdigest(), len(raw), "builtin")]
    if source.kind == "hub":
        return [_hub_file(source)]
    files: list[CorpusFile] = []
    by_key: dict[int, CorpusFile] = {}
    for path in _expand(source.paths):
        fmt = path.suffix.lower()[1:]
        sha, size = _digest_file(path, fmt in ("txt", "jsonl") and source.errors == "strict")
        if size == 0:
            raise CorpusError(f"{path}: empty file, no documents")
        seen = by_key.get(_key39(sha))
        if seen is not None and seen.sha256 == sha:
            warnings.warn(f"{path} has the same content as {seen.path}; skipped", stacklevel=2)
            continue
        if seen is not None:
            raise CorpusError(f"{path} and {seen.path}: file keys collide in their first 39 bits; "
                              f"sample ids would clash (change either file by one byte)")
        by_key[_key39(sha)] = file = CorpusFile(str(path), sha, size, fmt)  # type: ignore[arg-type]
        files.append(file)
    if not files:
        raise CorpusError(f"empty corpus: no {'/'.join(SUPPORTED_SUFFIXES)} files in {source.paths}")
    return files


def corpus_digest(files: Iterable[CorpusFile]) -> str:
    """sha256 over the ordered file keys: the corpus's identity for provenance."""
    return hashlib.sha256("\n".join(f.sha256 for f in files).encode()).hexdigest()


# ----------------------------------------------------------------------------- reading


def _decode(raw: bytes, where: str, errors: str, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _utf8_error(where, offset + e.start) from None


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise CorpusError(f"{where}: no field {field!r} (fields: {sorted(record)[:20]}); set text_field")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value or ""


def _read_txt(path: Path, source: CorpusSource) -> Iterator[str]:
    if source.text_split == "file":
        yield _decode(path.read_bytes(), str(path), source.errors).removeprefix("\ufeff")
        return
    block: list[str] = []
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(raw, str(path), source.errors, offset)
            if offset == 0:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\r\n")
                block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _read_jsonl(path: Path, source: CorpusSource) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            line = _decode(raw, where, source.errors, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield _text_of(record, source.text_field, where)


def _read_parquet(path: Path, source: CorpusSource) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise CorpusError(f"{path}: not a readable Parquet file: {e}") from e
    field = source.text_field
    schema = pf.schema_arrow
    if field not in schema.names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {schema.names[:20]}); set text_field")
    kind = schema.field(field).type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {field!r} is {kind}, not text")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if binary and value is not None:
                value = _decode(value, f"{path} row {row} (offset within the value)", source.errors)
            yield value or ""
            row += 1


def _hub_file(source: CorpusSource) -> CorpusFile:
    from huggingface_hub import HfApi

    try:
        commit = HfApi().dataset_info(source.name, revision=source.revision).sha
    except Exception as e:
        raise CorpusError(f"hub dataset {source.name!r} could not be resolved on the hub (the "
                          f"machine may be offline): {type(e).__name__}: {e}") from e
    ident = json.dumps([source.name, source.config, source.hub_split, commit])
    return CorpusFile(f"hub:{source.name}@{commit}", hashlib.sha256(ident.encode()).hexdigest(), 0, "hub")


def _read_hub(file: CorpusFile, source: CorpusSource) -> Iterator[str]:
    import datasets

    name, commit = file.path.removeprefix("hub:").rsplit("@", 1)
    try:
        ds = datasets.load_dataset(name, source.config, split=source.hub_split, revision=commit,
                                   streaming=True)
    except Exception as e:
        raise CorpusError(f"hub dataset {name!r} could not be loaded (the machine may be "
                          f"offline): {type(e).__name__}: {e}") from e
    for i, record in enumerate(ds):
        yield _text_of(record, source.text_field, f"{file.path} row {i}")


def read_documents(file: CorpusFile, source: CorpusSource) -> Iterator[str]:
    """The documents of one corpus file, in file order (empty ones included)."""
    if file.format == "builtin":
        topics = _builtin_topics()
        return iter([topics[k] for k in sorted(topics)])
    if file.format == "hub":
        return _read_hub(file, source)
    path = Path(file.path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file does not exist: {path}")
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}[file.format]
    return reader(path, source)


# ----------------------------------------------------------------------------- split and ids


def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether a document belongs to the validation split: the first 64 bits of
    sha256("kdcache-split/<seed>/" + text) < val_fraction · 2^64. Depends on content only."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1]")
    if val_fraction == 0.0:
        return False
    h = hashlib.sha256(f"kdcache-split/{seed}/".encode() + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big") < val_fraction * 2.0**64


def sample_ids(file_key: str, start_row: int, count: int, split: Split | None = None) -> np.ndarray:
    """Stable ids of rows ``start_row .. start_row+count-1`` of a file (see ``ROW_BITS``)."""
    if start_row + count > MAX_ROWS_PER_FILE:
        raise CorpusError(f"file {file_key[:12]}: more than {MAX_ROWS_PER_FILE} rows in one split; "
                          f"split the file into smaller ones")
    base = (_key39(file_key) << (ROW_BITS + 1)) | (int(split == "validation") << ROW_BITS)
    return np.arange(base + start_row, base + start_row + count, dtype=np.uint64)


# ----------------------------------------------------------------------------- packing


def iter_packed(docs: Iterable[str], tokenizer: Any, row_length: int, file_key: str, *,
                split: Split | None = None, val_fraction: float = 0.0, seed: int = 0,
                eos_id: int | None = None, rows_per_chunk: int | None = None,
                batch_docs: int = 256, name: str | None = None, with_text: bool = False) -> Iterator[PackedRows]:
    """Pack a file's documents into rows, yielding chunks of ``rows_per_chunk`` rows (all rows
    in one chunk when None). The last chunk holds the padded tail and may have zero rows; the
    counts of all chunks add up to the file's. ``split`` packs only that side of the
    train/validation split; ``name`` (the file's path) names the file in errors. ``with_text``
    adds each row's text and its tokens' character ends (a fast tokenizer's offsets)."""
    if row_length < 1 or split not in (None, "train", "validation"):
        raise ValueError(f"row_length={row_length} must be >= 1 and split={split!r} one of "
                         f"'train', 'validation', None")
    if len(file_key) < 10 or any(c not in "0123456789abcdef" for c in file_key):
        raise ValueError(f"file_key={file_key!r} must be a lowercase hex sha256 digest")
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: pass eos_id")
    where, T, chunk = name or f"file {file_key[:12]}", row_length, rows_per_chunk or 0
    toks: list[np.ndarray] = []
    dids: list[np.ndarray] = []
    spans: list[np.ndarray] = []  # with_text: [n, 2] piece start and end of each token in its document
    texts: dict[int, str] = {}
    counts = dict.fromkeys(("docs", "empty_docs", "long_docs", "held_out_docs", "tokens"), 0)
    state = {"buffered": 0, "next_row": 0, "non_empty": 0}

    def tokenize(batch: list[tuple[int, str]]) -> None:
        encoding = tokenizer([t for _, t in batch], add_special_tokens=False, split_special_tokens=True,
                             truncation=False, verbose=False, return_attention_mask=False,
                             return_offsets_mapping=with_text)
        for i, ((idx, text), ids) in enumerate(zip(batch, encoding["input_ids"], strict=True)):
            if with_text:
                ends = piece_ends(offsets_of(tokenizer, encoding, i, where), len(text))
                starts = np.concatenate([[0], ends[:-1]])
                spans.append(np.stack([np.append(starts, len(text)), np.append(ends, len(text))], axis=1))
                texts[idx] = text
            toks.append(np.array([*ids, eos], np.int32))
            dids.append(np.full(len(ids) + 1, idx, np.int32))
            counts["docs"] += 1
            counts["tokens"] += len(ids) + 1
            counts["long_docs"] += len(ids) + 1 > T
            state["buffered"] += len(ids) + 1

    def emit(n_rows: int) -> PackedRows:
        flat = np.concatenate([np.empty(0, np.int32), *toks])
        flat_d = np.concatenate([np.empty(0, np.int32), *dids])
        take = min(n_rows * T, len(flat))
        ids, doc = np.full(n_rows * T, eos, np.int32), np.full(n_rows * T, -1, np.int32)
        valid = np.arange(n_rows * T) < take
        ids[:take], doc[:take] = flat[:take], flat_d[:take]
        toks[:], dids[:] = [flat[take:]], [flat_d[take:]]
        extra = {}
        if with_text:
            flat_s = np.concatenate([np.empty((0, 2), np.int64), *spans])
            span = np.zeros((n_rows * T, 2), np.int64)
            span[:take] = flat_s[:take]
            spans[:] = [flat_s[take:]]
            shape2 = (n_rows, T)
            extra["text"], extra["char_end"] = join_rows(texts, doc.reshape(shape2), span[:, 0].reshape(shape2),
                                                         span[:, 1].reshape(shape2))
            first_left = int(flat_d[take]) if take < len(flat_d) else None
            for key in [k for k in texts if first_left is None or k < first_left]:
                del texts[key]  # documents wholly packed
        state["buffered"] -= take
        sids = sample_ids(file_key, state["next_row"], n_rows, split)
        state["next_row"] += n_rows
        shape = (n_rows, T)
        rows = PackedRows(ids.reshape(shape), doc.reshape(shape), valid.reshape(shape), sids,
                          file_key, split, **counts, **extra)
        counts.update(dict.fromkeys(counts, 0))
        return rows

    batch: list[tuple[int, str]] = []
    for idx, text in enumerate(docs):
        if not isinstance(text, str):
            raise CorpusError(f"{where}: document {idx} is {type(text).__name__}, not str")
        if not text.strip():
            counts["empty_docs"] += 1
            continue
        state["non_empty"] += 1
        if split is not None and is_validation(text, val_fraction, seed) != (split == "validation"):
            counts["held_out_docs"] += 1
            continue
        batch.append((idx, text))
        if len(batch) >= batch_docs:
            tokenize(batch)
            batch = []
            while chunk and state["buffered"] >= chunk * T:
                yield emit(chunk)
    if batch:
        tokenize(batch)
    if state["non_empty"] == 0:
        raise CorpusError(f"{where}: no documents ({counts['empty_docs']} empty ones skipped)")
    while chunk and state["buffered"] >= chunk * T:
        yield emit(chunk)
    yield emit(-(-state["buffered"] // T))


def pack_file(docs: Iterable[str], tokenizer: Any, row_length: int, file_key: str, *,
              split: Split | None = None, val_fraction: float = 0.0, seed: int = 0,
              eos_id: int | None = None, batch_docs: int = 256,
              name: str | None = None, with_text: bool = False) -> PackedRows:
    """All rows of one file at once (see :func:`iter_packed`)."""
    (rows,) = iter_packed(docs, tokenizer, row_length, file_key, split=split,
                          val_fraction=val_fraction, seed=seed, eos_id=eos_id,
                          batch_docs=batch_docs, name=name, with_text=with_text)
    return rows


def pack_corpus_file(file: CorpusFile, source: CorpusSource, tokenizer: Any, row_length: int,
                     **kwargs: Any) -> PackedRows:
    """Read and pack one listed corpus file (``kwargs`` as for :func:`pack_file`)."""
    return pack_file(read_documents(file, source), tokenizer, row_length, file.sha256,
                     name=file.path, **kwargs)
