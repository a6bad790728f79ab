"""The two JSON records of a store: `store.json` (once per store) and `COMMIT.json` (per shard).

`store.json` carries the field layout with every codec chain, so a reader decodes from the
store alone. A shard's `COMMIT.json` names every file with its size and digest (see
`kdstore.digest`): it is both the proof that the shard is complete and the checklist that
`verify` and every reader check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdstore.digest import ALGORITHMS, WRITE_ALGORITHM
from kdstore.errors import CorruptShardError, FormatVersionError, NotAStoreError, SpecError
from kdstore.fields import Field, field_layout_from_json, field_layout_to_json, fields_for_spec
from kdstore.location import Location
from kdstore.spec import FORMAT_VERSION, Provenance, StoreSpec, fingerprint

STORE_JSON = "store.json"
COMMIT_JSON = "COMMIT.json"
SHARDS_DIR = "shards"
TEACHER_DIR = "teacher"
STORE_JSON_INDENT = 2  # how the writer serialises store.json; verify checks the bytes against it
COMMIT_JSON_INDENT = 1
RECORD_SHA256 = "record_sha256"
SAMPLE_ID_HASH = "sample_id_hash"  # a key of a commit record's stats, see `sample_id_hash`
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class StoreMeta:
    spec: StoreSpec
    provenance: Provenance
    fingerprint: str
    fields: tuple[Field, ...]
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(cls, spec: StoreSpec, provenance: Provenance) -> StoreMeta:
        return cls(spec, provenance, fingerprint(spec, provenance), fields_for_spec(spec, FORMAT_VERSION))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "kdcache-store",
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "spec": self.spec.to_dict(),
            "provenance": self.provenance.to_dict(),
            "fields": field_layout_to_json(self.fields),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> StoreMeta:
        if data.get("format") != "kdcache-store":
            raise NotAStoreError(f"{where} is not a kdcache store.json (format={data.get('format')!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where} has format version {version}; this kdcache reads versions up to "
                f"{FORMAT_VERSION}: upgrade kdcache to read it"
            )
        try:
            spec = StoreSpec.from_dict(data["spec"], f"{where}: spec")
            provenance = Provenance.from_dict(data["provenance"], f"{where}: provenance")
            fields = field_layout_from_json(data["fields"])
            stamp = data["fingerprint"]
        except KeyError as exc:
            raise SpecError(f"{where}: missing key {exc}") from exc
        return cls(spec, provenance, stamp, fields, version)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def read_store_meta(location: Location) -> StoreMeta:
    where = location.path(STORE_JSON)
    try:
        raw = location.read_bytes(STORE_JSON)
    except FileNotFoundError:
        raise NotAStoreError(f"no kdcache store at {location.url!r}: {where} does not exist") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NotAStoreError(f"{where} is not valid JSON: {exc}") from exc
    return StoreMeta.from_json(data, where)


@dataclass(frozen=True)
class FileRecord:
    """One listed file: its size and its digest under `algorithm` (the JSON key of the digest)."""

    bytes: int
    digest: str
    algorithm: str = WRITE_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, self.algorithm: self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileRecord:
        found = [a for a in ALGORITHMS if a in data]
        if len(found) != 1:
            raise ValueError(f"a file entry needs exactly one digest of {sorted(ALGORITHMS)}, has {sorted(data)}")
        return cls(int(data["bytes"]), str(data[found[0]]), found[0])


def _files_json(files: Mapping[str, FileRecord]) -> dict[str, Any]:
    return {k: v.to_json() for k, v in sorted(files.items())}


def _files_from_json(files: Mapping[str, Any]) -> dict[str, FileRecord]:
    return {k: FileRecord.from_json(v) for k, v in files.items()}


@dataclass(frozen=True)
class CommitRecord:
    shard_id: str
    fingerprint: str
    rows: int
    tokens: int
    valid_tokens: int
    sample_id_min: int
    sample_id_max: int
    files: Mapping[str, FileRecord]
    stats: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @property
    def sample_id_hash(self) -> int | None:
        """`sample_id_hash` of the shard's ids, as written (None: a record written before it)."""
        value = self.stats.get(SAMPLE_ID_HASH)
        return None if value is None else int(value)

    def to_json(self, checksum: str | None = None) -> dict[str, Any]:
        """The record as written; `checksum`: one already checked against it (from_json does),
        so it is not computed again."""
        body = {
            "shard_id": self.shard_id,
            "fingerprint": self.fingerprint,
            "format_version": self.format_version,
            "rows": self.rows,
            "tokens": self.tokens,
            "valid_tokens": self.valid_tokens,
            "sample_id_min": self.sample_id_min,
            "sample_id_max": self.sample_id_max,
            "files": _files_json(self.files),
            "stats": dict(self.stats),
            "meta": dict(self.meta),
            "created_at": self.created_at,
        }
        return {**body, RECORD_SHA256: checksum or record_checksum(body)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommitRecord:
        if RECORD_SHA256 in data and data[RECORD_SHA256] != record_checksum(data):
            raise ValueError(f"its {RECORD_SHA256} does not match its contents (altered)")
        return cls(
            shard_id=data["shard_id"],
            fingerprint=data["fingerprint"],
            rows=int(data["rows"]),
            tokens=int(data["tokens"]),
            valid_tokens=int(data["valid_tokens"]),
            sample_id_min=int(data["sample_id_min"]),
            sample_id_max=int(data["sample_id_max"]),
            files=_files_from_json(data["files"]),
            stats=data.get("stats", {}),
            meta=data.get("meta", {}),
            created_at=data.get("created_at", ""),
            format_version=int(data.get("format_version", FORMAT_VERSION)),
        )


@dataclass(frozen=True)
class TeacherRecord:
    """teacher/COMMIT.json: every file of teacher/ with its size and digest, written once, last."""

    fingerprint: str
    files: Mapping[str, FileRecord]

    def to_json(self) -> dict[str, Any]:
        return {"format": "kdcache-teacher", "fingerprint": self.fingerprint,
                "files": _files_json(self.files)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TeacherRecord:
        if not isinstance(data, Mapping):
            raise ValueError(f"a JSON object expected, got {type(data).__name__}")
        if data.get("format") != "kdcache-teacher":
            raise ValueError(f"format is {data.get('format')!r}, not 'kdcache-teacher'")
        return cls(data["fingerprint"], _files_from_json(data["files"]))


def read_teacher_record(location: Location) -> TeacherRecord | None:
    """The commit record of teacher/ (None when teacher/ has none); ValueError when unreadable."""
    try:
        raw = location.read_bytes(TEACHER_DIR, COMMIT_JSON)
    except FileNotFoundError:
        return None
    record = TeacherRecord.from_json(json.loads(raw))
    if raw != json_bytes(record.to_json(), COMMIT_JSON_INDENT):
        raise ValueError("its bytes differ from the record they parse to (altered)")
    return record


def sample_id_hash(sample_ids: np.ndarray) -> int:
    """An order-free hash of a multiset of sample ids: the sum mod 2^64 of each id's splitmix64
    mix. It adds up like any other sum (`add_hashes`), so the hashes in the shards' commit
    records give the hash of the whole store, and two stores cut into shards differently
    compare their sample ids without reading them. Kept in a record's stats, so a kdcache
    from before it reads (and verifies) the record unchanged."""
    z = np.asarray(sample_ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return int(z.sum(dtype=np.uint64))


def add_hashes(hashes: Iterable[int]) -> int:
    """`sample_id_hash` of the union (as multisets) of the parts whose hashes are given."""
    return sum(hashes) & _MASK64


def record_checksum(data: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON without its own checksum: a commit record's counts,
    sample-id range and stats are covered as well as the files it lists."""
    body = {k: v for k, v in data.items() if k != RECORD_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_bytes(data: Mapping[str, Any], indent: int) -> bytes:
    """The one serialisation of store.json and commit records (so verify can compare bytes)."""
    return json.dumps(data, indent=indent).encode()


def read_commit(location: Location, shard_id: str) -> CommitRecord:
    """The commit record of one shard; CorruptShardError naming the file when unreadable."""
    try:
        raw = location.read_bytes(SHARDS_DIR, shard_id, COMMIT_JSON)
    except FileNotFoundError:
        path = location.path(SHARDS_DIR, shard_id, COMMIT_JSON)
        raise CorruptShardError(f"shard {shard_id}: {path} is missing (shard not committed)") from None
    return parse_commit(raw, location, shard_id)


def parse_commit(raw: bytes, location: Location, shard_id: str) -> CommitRecord:
    return load_commit(raw, location, shard_id)[0]


_PARSED: dict[bytes, tuple[CommitRecord, str | None]] = {}  # by the record's bytes, so never stale
_PARSED_MAX = 65_536


def load_commit(raw: bytes, location: Location, shard_id: str) -> tuple[CommitRecord, str | None]:
    """A commit record and the checksum it carries (None: written without one). Parsed once per
    process: the check before training and the stream after it read the same records."""
    if (known := _PARSED.get(raw)) is not None:
        return known
    try:
        data = json.loads(raw)
        parsed = CommitRecord.from_json(data), data.get(RECORD_SHA256)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        path = location.path(SHARDS_DIR, shard_id, COMMIT_JSON)
        raise CorruptShardError(f"shard {shard_id}: {path} is not a valid commit record ({exc!r})") from exc
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[raw] = parsed
    return parsed


def committed_shard_ids(location: Location) -> list[str]:
    """Shard ids with a commit record, sorted. Staging and quarantined dirs start with '.'."""
    return [
        name
        for name in location.list_dirs(SHARDS_DIR)
        if not name.startswith(".") and location.exists(SHARDS_DIR, name, COMMIT_JSON)
    ]
