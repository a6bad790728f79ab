"""From a cache config to the list of shards, and what they will cost on disk (`kdcache plan`).

Shards are keyed by the content digest of the corpus file they come from, the split, and their
index in that file: `<sha256[:16]>-<split>-<index>`. Same corpus + tokenizer + packing ⇒ same
shard ids and sample ids on any machine; a new file only adds shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdstore.fields import TEXT, fields_for_spec
from kdstore.spec import StoreSpec
from pipeline.capture.chat import iter_records
from pipeline.capture.corpus import CorpusFile, CorpusSource, list_corpus_files, read_documents
from pipeline.capture.packing import PackedRows, iter_packed, iter_packed_chat
from pipeline.capture.pass_setup import build_spec, teacher_for
from pipeline.config import CacheConfig

# Compressed/raw size of each stored field, measured on the offline teacher by bench/store.py
# (top-k 64, pydoc text); used only for the estimate that `kdcache plan` prints.
COMPRESSION_ESTIMATE = {"topk_ids": 0.9, "topk_logp": 0.25, "topk_tail": 0.95, "tokens": 0.4, "draws": 0.6, "tail_draws": 0.72,
                        "hidden": 0.93, "attn": 0.4, "text": 0.35, "loss_mask": 0.05}
CHARS_PER_TOKEN = 4.0  # English prose, the teacher's BPE: the stored text's raw size


@dataclass(frozen=True, eq=False)
class ShardPlan:
    shard_id: str
    file: CorpusFile
    index: int
    rows: PackedRows

    def meta(self) -> dict[str, Any]:
        r = self.rows
        return {
            "file": self.file.path,
            "file_sha256": self.file.sha256,
            "shard_index": self.index,
            "split": r.split or "all",
            "docs": r.docs,
            "empty_docs": r.empty_docs,
            "long_docs": r.long_docs,
            "valid_tokens": int(r.valid.sum()),
            **({} if r.loss_mask is None else {"skipped_docs": r.skipped_docs, "loss_tokens": int(r.loss_mask.sum())}),
        }


def corpus_source(config: CacheConfig) -> CorpusSource:
    c = config.corpus
    return CorpusSource(kind=c.kind, paths=tuple(c.paths), text_field=c.text_field, text_split=c.text_split,
                        errors=c.errors, name=c.name)


def plan_shards(config: CacheConfig, tokenizer: Any) -> list[ShardPlan]:
    source = corpus_source(config)
    split = None if config.split == "all" else config.split
    plans = []
    for file in list_corpus_files(source):
        chunks = _file_chunks(config, source, file, tokenizer, split)
        for index, rows in enumerate(c for c in chunks if c.num_rows > 0):
            plans.append(ShardPlan(f"{file.sha256[:16]}-{config.split}-{index:05d}", file, index, rows))
            if config.max_tokens is not None and sum(p.rows.num_rows for p in plans) * config.row_length >= config.max_tokens:
                return plans
    return plans


def _file_chunks(config: CacheConfig, source: CorpusSource, file: CorpusFile, tokenizer: Any,
                 split: Any) -> Iterator[PackedRows]:
    c = config.corpus
    if c.kind == "chat":
        chat = c.chat_options
        records = iter_records(file, source)
        if c.max_documents is not None:
            records = itertools.islice(records, c.max_documents)
        return iter_packed_chat(records, tokenizer, config.row_length, file.sha256, shape=chat.shape, mask=chat.mask,
                                too_long=chat.too_long, on_bad=chat.on_bad, template=chat.template, split=split,
                                val_fraction=c.val_fraction, rows_per_chunk=config.shard_rows, name=file.path)
    docs = read_documents(file, source)
    if c.max_documents is not None:
        docs = itertools.islice(docs, c.max_documents)
    return iter_packed(docs, tokenizer, config.row_length, file.sha256, split=split, val_fraction=c.val_fraction,
                       rows_per_chunk=config.shard_rows, name=file.path, with_text=config.signals.text)


@dataclass(frozen=True)
class CachePlan:
    store: str
    shards: int
    rows: int
    tokens: int
    valid_tokens: int
    files: int
    long_docs: int
    empty_docs: int
    raw_bytes_per_token: dict[str, float]
    est_bytes_per_token: dict[str, float]
    skipped_docs: int = 0  # chat: conversations skipped (bad records, too long)
    loss_tokens: int | None = None  # chat: tokens a student is trained on

    @property
    def est_bytes(self) -> float:
        return sum(self.est_bytes_per_token.values()) * self.tokens

    def to_markdown(self) -> str:
        lines = [
            f"plan for store {self.store}: {self.files} corpus file(s) → {self.shards} shards, {self.rows} rows, "
            f"{self.tokens:,} tokens ({self.valid_tokens:,} valid); " + (
                f"{self.long_docs} long conversations cut at a turn boundary, {self.skipped_docs} skipped, "
                f"{self.loss_tokens:,} tokens in the loss mask" if self.loss_tokens is not None else
                f"{self.long_docs} long documents split across rows, {self.empty_docs} empty documents skipped"),
            "",
            "| field | raw B/token | expected B/token | expected total |",
            "|---|---:|---:|---:|",
        ]
        for name in self.raw_bytes_per_token:
            est = self.est_bytes_per_token[name]
            lines.append(f"| {name} | {self.raw_bytes_per_token[name]:.1f} | {est:.1f} | {_human(est * self.tokens)} |")
        total = sum(self.est_bytes_per_token.values())
        lines.append(f"| **all** | {sum(self.raw_bytes_per_token.values()):.1f} | {total:.1f} | {_human(self.est_bytes)} |")
        lines.append("")
        lines.append(f"expected disk per billion tokens: {_human(total * 1e9)}")
        return "\n".join(lines)


def field_bytes_per_token(spec: StoreSpec) -> tuple[dict[str, float], dict[str, float]]:
    """Raw (uncompressed) and expected on-disk bytes/token of each field group of a spec."""
    raw: dict[str, float] = {}
    for f in fields_for_spec(spec):
        per_row = float(np.prod(f.shape)) if f.shape else 1.0
        if f.container == TEXT:
            size = CHARS_PER_TOKEN  # one string per row, about this many UTF-8 bytes per token
        else:
            size = per_row * np.dtype(f.stored_dtype).itemsize / spec.row_length
        if f.name in ("draw_ids", "draw_counts"):
            size = size * 0.5 + (1.0 if f.name == "draw_ids" else 0.0)  # ~half the draws are unique
        if f.name == "tail_ids":  # a flat tail: nearly every tail draw is unique (bench/store.py)
            size += 1.0  # ~half the draws are unique
        if spec.hidden is not None and spec.hidden.dtype == "int8" and f.name.startswith("hidden_"):
            size += 2.0  # the float16 per-token scale
        raw[f.group] = raw.get(f.group, 0.0) + size
    est = {}
    for group, size in raw.items():
        key = group if group in COMPRESSION_ESTIMATE else group.split("_")[0]
        est[group] = size * COMPRESSION_ESTIMATE.get(key, 1.0)
    return raw, est


def plan_cache(config: CacheConfig) -> CachePlan:
    """Tokenise and pack (no teacher forward) to count rows, then size every field."""
    teacher = teacher_for(config)
    plans = plan_shards(config, teacher.tokenizer)
    spec = build_spec(config, teacher.facts)
    raw, est = field_bytes_per_token(spec)
    rows = sum(p.rows.num_rows for p in plans)
    return CachePlan(
        store=config.store,
        shards=len(plans),
        rows=rows,
        tokens=rows * config.row_length,
        valid_tokens=sum(int(p.rows.valid.sum()) for p in plans),
        files=len({p.file.sha256 for p in plans}),
        long_docs=sum(p.rows.long_docs for p in plans),
        empty_docs=sum(p.rows.empty_docs for p in plans),
        raw_bytes_per_token=raw,
        est_bytes_per_token=est,
        skipped_docs=sum(p.rows.skipped_docs for p in plans),
        loss_tokens=sum(int(p.rows.loss_mask.sum()) for p in plans) if spec.loss_mask else None,
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"
