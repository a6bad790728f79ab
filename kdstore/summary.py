"""What a store holds, in numbers: rows, tokens, bytes per token per field, kept mass.

Computed from the commit records alone (file sizes and write-time stats), so inspecting a
store of any size reads a few KB per shard and never decodes data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdstore.reader import StoreReader
from kdstore.records import COMMIT_JSON
from kdstore.shard_io import DENSE_DIR


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
