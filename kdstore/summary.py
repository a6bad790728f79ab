"""What a store holds, in numbers: rows, tokens, bytes per token per field, kept mass.

Computed from the commit records alone (file sizes and write-time stats), so inspecting a
store of any size reads a few KB per shard and never decodes data.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.fields import fields_for_spec
from kdstore.reader import StoreReader
from kdstore.records import COMMIT_JSON
from kdstore.shard_io import DENSE_DIR, write_shard_files


@dataclass(frozen=True)
class StoreSummary:
    url: str
    fingerprint: str
    shards: int
    rows: int
    tokens: int
    valid_tokens: int
    bytes_total: int
    bytes_per_field: dict[str, int]
    mean_kept_mass: float | None
    spec: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_total / max(self.tokens, 1)

    def field_bytes_per_token(self) -> dict[str, float]:
        return {k: v / max(self.tokens, 1) for k, v in self.bytes_per_field.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
            "rows": self.rows,
            "tokens": self.tokens,
            "valid_tokens": self.valid_tokens,
            "bytes_total": self.bytes_total,
            "bytes_per_token": round(self.bytes_per_token, 3),
            "bytes_per_token_per_field": {k: round(v, 3) for k, v in self.field_bytes_per_token().items()},
            "mean_kept_mass": self.mean_kept_mass,
            "spec": self.spec,
            "provenance": self.provenance,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# kdcache store `{self.url}`",
            "",
            f"fingerprint `{self.fingerprint}` · {self.shards} shards · {self.rows} rows · "
            f"{self.tokens} tokens ({self.valid_tokens} valid) · {self.bytes_total / 1e6:.2f} MB · "
            f"{self.bytes_per_token:.1f} B/token",
        ]
        if self.mean_kept_mass is not None:
            lines.append(f"mean probability mass kept by the top-k ids: {self.mean_kept_mass:.4f}")
        lines += ["", "| field (file) | bytes | bytes/token |", "|---|---:|---:|"]
        for name, size in sorted(self.bytes_per_field.items()):
            lines.append(f"| {name} | {size} | {size / max(self.tokens, 1):.2f} |")
        return "\n".join(lines)


def field_of_file(rel: str) -> str:
    """The field group a shard file belongs to: `topk_ids.arrow` → topk_ids, dense arrays by name."""
    if rel == COMMIT_JSON:
        return "commit record"
    if rel.startswith(DENSE_DIR + "/"):
        parts = rel.split("/")
        return parts[1] if len(parts) > 2 else "dense (metadata)"
    return rel.removesuffix(".arrow")


def summarize(url: str) -> StoreSummary:
    reader = StoreReader(url)
    shards = reader.shard_ids()
    rows = tokens = valid = 0
    per_field: dict[str, int] = {}
    kept_sum, kept_seen = 0.0, False
    for shard in shards:
        record = reader.record(shard)
        rows += record.rows
        tokens += record.tokens
        valid += record.valid_tokens
        for rel, info in record.files.items():
            key = field_of_file(rel)
            per_field[key] = per_field.get(key, 0) + info.bytes
        if "kept_mass_sum" in record.stats:
            kept_sum += float(record.stats["kept_mass_sum"])
            kept_seen = True
    return StoreSummary(
        url=url,
        fingerprint=reader.fingerprint,
        shards=len(shards),
        rows=rows,
        tokens=tokens,
        valid_tokens=valid,
        bytes_total=sum(per_field.values()),
        bytes_per_field=per_field,
        mean_kept_mass=(kept_sum / valid) if kept_seen and valid else None,
        spec=reader.spec.to_dict(),
        provenance=reader.meta.provenance.to_dict(),
    )


def topk_bytes_by_k(url: str, ks: Sequence[int], max_shards: int = 2) -> list[dict[str, float]]:
    """Bytes/token of the top-k files (ids, log-probs, tail) and mean kept mass if the store had
    kept only k ids, for each k ≤ the store's: its first shards' top-k truncated and re-encoded
    with the store's own codecs. Ids are in probability order, so the truncation is exact; the
    new tail is the stored tail plus the dropped ids' (quantised) probabilities."""
    reader = StoreReader(url)
    spec = reader.spec
    if spec.topk is None:
        raise ValueError(f"store {url!r} holds no top-k signal")
    bad = [k for k in ks if not 1 <= k <= spec.topk.k]
    if bad:
        raise ValueError(f"k {bad}: store {url!r} keeps {spec.topk.k} ids, so only k in 1..{spec.topk.k} can be measured")
    names = ["sample_id", "input_ids", "doc_ids", "valid", "topk_ids", "topk_logp", "topk_tail"]
    parts = [reader.read_shard(s, names) for s in reader.shard_ids()[:max_shards]]
    if not parts:
        raise ValueError(f"store {url!r} has no committed shard")
    rows = {n: np.concatenate([p[n] for p in parts]) for n in names}
    valid = rows["valid"].astype(bool)
    tokens = valid.size
    out = []
    for k in sorted(set(ks)):
        dropped = np.exp(rows["topk_logp"][..., k:].astype(np.float64)).sum(-1)
        trimmed = {**rows, "topk_ids": rows["topk_ids"][..., :k], "topk_logp": rows["topk_logp"][..., :k],
                   "topk_tail": np.clip(rows["topk_tail"] + dropped, 0, 1).astype(np.float32)}
        k_spec = dataclasses.replace(spec, topk=dataclasses.replace(spec.topk, k=k), sampled=None, hidden=None,
                                     attention=None, shard_rows=max(spec.shard_rows, len(valid)))
        fields = [f for f in fields_for_spec(k_spec) if f.name.startswith("topk_") or f.name in names]
        with tempfile.TemporaryDirectory() as tmp:
            write_shard_files(Path(tmp), fields, trimmed, spec.zstd_level, spec.record_batch_rows)
            size = sum(p.stat().st_size for p in Path(tmp).glob("topk_*.arrow"))
        out.append({"k": k, "bytes_per_token": size / tokens,
                    "kept_mass": float(1 - trimmed["topk_tail"][valid].mean())})
    return out
