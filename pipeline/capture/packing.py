"""Documents → fixed-length token rows with stable ids.

A file's documents are tokenised with the teacher's tokenizer, joined as ``doc + [eos]`` and cut
into rows of ``row_length`` tokens; a row's ``sample_id`` depends only on its file's key
(`pipeline.capture.corpus`), its split and its row index, so the same corpus, tokenizer and packing give
the same rows, in the same order, on any machine.

Choices:
- Empty/whitespace-only documents (and null text) are skipped and counted (``empty_docs``); a
  file with no non-empty document is an error.
- The last row is padded with ``eos`` marked ``valid=False`` (no text is lost); padding has
  ``doc_ids == -1``. ``doc_ids`` number every document read from the file (empty and
  other-split ones included), so they point back into the file.
- Special-token text inside a document (a literal ``<|im_end|>``) is tokenised as text:
  ``eos`` appears only between documents.
- The split is by content, with a seed: stable under reordering, and duplicates land on the same
  side. ``val_fraction`` of the documents are held out, by a hash of each one's text
  (:func:`is_validation`); a second hash halves the held-out text into ``validation`` (every
  choice of weight or recipe) and ``test`` (reported figures), block by block
  (:func:`split_text`). ``held_out`` names both halves together (what ``validation`` named
  before the test split existed). The train side does not depend on the second hash, so train
  rows and their ids are what they were before it.
- ``with_text`` also keeps each row's text and every token's character end
  (`pipeline.capture.row_text`), for students with another tokenizer.
- Conversations (:func:`iter_packed_chat`) are packed whole, never split across rows: each row
  holds as many whole conversations as fit, then padding. One longer than a row is cut at its
  last turn boundary that fits (after an assistant turn) or skipped, and counted (``long_docs``
  truncated, ``skipped_docs`` skipped). Rows carry the ``loss_mask`` of `pipeline.capture.chat`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.capture.corpus import CorpusError, CorpusFile, CorpusSource, key39, read_documents
from pipeline.capture.row_text import join_rows, offsets_of, piece_ends

Split = Literal["train", "validation", "test", "held_out"]
SPLITS: tuple[str, ...] = ("train", "validation", "test", "held_out")
TEST_SHARE = 0.5  # of the held-out text, by a second content hash (split_text)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# sample_id = key39 << 24 | held_out << 23 | row: 39 bits of the file digest, one split bit
# and 23 bits of row index (at most 8,388,608 rows per file and split), 63 bits in all so the
# id also fits a signed int64. Files of one corpus are checked to differ in their 39 bits.
ROW_BITS = 23
MAX_ROWS_PER_FILE = 1 << ROW_BITS


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
    text: np.ndarray | None = None  # [N] str, with_text only: the row's text (pipeline.capture.row_text)
    char_end: np.ndarray | None = None  # [N, T] int32, with_text only: each token's end in it
    loss_mask: np.ndarray | None = None  # [N, T] bool, chat rows only: the tokens a student is trained on
    skipped_docs: int = 0  # chat: conversations skipped (bad records with on_bad=skip, too long with too_long=skip)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether a document is held out (the validation or the test split): the first 64 bits of
    sha256("kdcache-split/<seed>/" + text) < val_fraction · 2^64. Depends on content only."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1]")
    if val_fraction == 0.0:
        return False
    h = hashlib.sha256(f"kdcache-split/{seed}/".encode() + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big") < val_fraction * 2.0**64


def is_test(text: str, seed: int = 0) -> bool:
    """Whether held-out text belongs to the test half: the first 64 bits of
    sha256("kdcache-test/<seed>/" + text) < TEST_SHARE · 2^64."""
    h = hashlib.sha256(f"kdcache-test/{seed}/".encode() + text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big") < TEST_SHARE * 2.0**64


def in_split(text: str, split: Split | None, val_fraction: float, seed: int = 0) -> bool:
    """Whether a whole document (a conversation's key) belongs to ``split``: None is every
    document, "held_out" validation and test together."""
    if split is None:
        return True
    if split in ("train", "held_out"):
        return is_validation(text, val_fraction, seed) == (split == "held_out")
    return is_validation(text, val_fraction, seed) and is_test(text, seed) == (split == "test")


def split_text(text: str, split: Split | None, val_fraction: float, seed: int = 0) -> str | None:
    """The part of a text document in ``split``, or None. Train, held_out and None take whole
    documents (:func:`in_split`). Validation and test divide each held-out document by its
    blank-line blocks, each block by its own hash (:func:`is_test`), the kept ones joined by a
    blank line: a corpus of a few long documents (the built-in one holds out 4 of 79, one of
    them 87 % of the held-out text) still gives two halves of similar size."""
    if split not in ("validation", "test"):
        return text if in_split(text, split, val_fraction, seed) else None
    if not is_validation(text, val_fraction, seed):
        return None
    kept = [b for b in _BLANK_LINE.split(text) if b.strip() and is_test(b, seed) == (split == "test")]
    return "\n\n".join(kept) if kept else None


def check_split(split: Split | None, row_length: int) -> None:
    if row_length < 1 or (split is not None and split not in SPLITS):
        raise ValueError(f"row_length={row_length} must be >= 1 and split={split!r} one of {SPLITS} or None")


def sample_ids(file_key: str, start_row: int, count: int, split: Split | None = None) -> np.ndarray:
    """Stable ids of rows ``start_row .. start_row+count-1`` of a file (see ``ROW_BITS``)."""
    if start_row + count > MAX_ROWS_PER_FILE:
        raise CorpusError(f"file {file_key[:12]}: more than {MAX_ROWS_PER_FILE} rows in one split; "
                          f"split the file into smaller ones")
    held_out = split is not None and split != "train"  # its halves number their rows alike: a store holds one split
    base = (key39(file_key) << (ROW_BITS + 1)) | (int(held_out) << ROW_BITS)
    return np.arange(base + start_row, base + start_row + count, dtype=np.uint64)


# ----------------------------------------------------------------------------- packing


def iter_packed(docs: Iterable[str], tokenizer: Any, row_length: int, file_key: str, *,
                split: Split | None = None, val_fraction: float = 0.0, seed: int = 0,
                eos_id: int | None = None, rows_per_chunk: int | None = None,
                batch_docs: int = 256, name: str | None = None, with_text: bool = False) -> Iterator[PackedRows]:
    """Pack a file's documents into rows, yielding chunks of ``rows_per_chunk`` rows (all rows
    in one chunk when None). The last chunk holds the padded tail and may have zero rows; the
    counts of all chunks add up to the file's. ``split`` packs only the documents of
    that split (:func:`in_split`); ``name`` (the file's path) names the file in errors. ``with_text``
    adds each row's text and its tokens' character ends (a fast tokenizer's offsets)."""
    check_split(split, row_length)
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
        part = split_text(text, split, val_fraction, seed)
        if part is None:
            counts["held_out_docs"] += 1
            continue
        batch.append((idx, part))
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


# ----------------------------------------------------------------------------- conversations


def iter_packed_chat(records: Iterable[tuple[str, Any]], tokenizer: Any, row_length: int, file_key: str, *,
                     shape: str = "auto", mask: str = "assistant", too_long: str = "truncate",
                     on_bad: str = "error", template: str | None = None, split: Split | None = None,
                     val_fraction: float = 0.0, seed: int = 0, eos_id: int | None = None,
                     rows_per_chunk: int | None = None, name: str | None = None) -> Iterator[PackedRows]:
    """Pack a chat file's records ((where, record) pairs, `pipeline.capture.chat.iter_records`)
    into rows of whole conversations, chunks of ``rows_per_chunk`` rows (see the module docstring).
    ``doc_ids`` are record indices in the file; the split is by the conversation's canonical JSON."""
    from pipeline.capture.chat import (
        ChatRecordError,
        check_template,
        last_turn_only,
        parse_conversation,
        record_shape,
        render_conversation,
        split_key,
        truncate,
    )

    check_split(split, row_length)
    where_file, T = name or f"file {file_key[:12]}", row_length
    check_template(tokenizer, template)
    pad = tokenizer.eos_token_id if eos_id is None else eos_id
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # finished rows: ids, doc ids, mask
    row: list[tuple[np.ndarray, int, np.ndarray]] = []  # conversations of the open row
    counts = dict.fromkeys(("docs", "empty_docs", "long_docs", "held_out_docs", "tokens", "skipped_docs"), 0)
    state = {"next_row": 0, "kept": 0, "used": 0}

    def close_row() -> None:
        ids, doc, loss = np.full(T, pad, np.int32), np.full(T, -1, np.int32), np.zeros(T, bool)
        at = 0
        for conv_ids, idx, conv_mask in row:
            ids[at:at + len(conv_ids)], doc[at:at + len(conv_ids)], loss[at:at + len(conv_ids)] = conv_ids, idx, conv_mask
            at += len(conv_ids)
        rows.append((ids, doc, loss))
        row.clear()
        state["used"] = 0

    def emit(n: int) -> PackedRows:
        take, rows[:] = rows[:n], rows[n:]
        ids = np.stack([r[0] for r in take]) if take else np.empty((0, T), np.int32)
        doc = np.stack([r[1] for r in take]) if take else np.empty((0, T), np.int32)
        loss = np.stack([r[2] for r in take]) if take else np.empty((0, T), bool)
        sids = sample_ids(file_key, state["next_row"], len(take), split)
        state["next_row"] += len(take)
        packed = PackedRows(ids, doc, doc >= 0, sids, file_key, split, **counts, loss_mask=loss)
        counts.update(dict.fromkeys(counts, 0))
        return packed

    file_shape = None if shape == "auto" else shape
    for idx, (where, record) in enumerate(records):
        try:
            file_shape = file_shape or record_shape(record, where)
            messages = parse_conversation(record, where, file_shape)
            if not in_split(split_key(messages), split, val_fraction, seed):
                counts["held_out_docs"] += 1
                continue
            rendered = render_conversation(messages, tokenizer, template, mask, where, T)
        except ChatRecordError:
            if on_bad != "skip":
                raise
            counts["skipped_docs"] += 1
            continue
        if len(rendered.ids) > T:
            cut = truncate(rendered, T) if too_long == "truncate" else None
            if cut is None:
                counts["skipped_docs"] += 1
                continue
            rendered = cut
            counts["long_docs"] += 1
        if mask == "last":
            rendered = last_turn_only(rendered)
        if state["used"] + len(rendered.ids) > T:
            close_row()
        row.append((rendered.ids, idx, rendered.mask))
        state["used"] += len(rendered.ids)
        state["kept"] += 1
        counts["docs"] += 1
        counts["tokens"] += len(rendered.ids)
        while rows_per_chunk and len(rows) >= rows_per_chunk:
            yield emit(rows_per_chunk)
    if state["kept"] == 0 and counts["held_out_docs"] == 0:
        raise CorpusError(f"{where_file}: no usable conversations ({counts['skipped_docs']} skipped)")
    if row:
        close_row()
    while rows_per_chunk and len(rows) >= rows_per_chunk:
        yield emit(rows_per_chunk)
    yield emit(len(rows))
