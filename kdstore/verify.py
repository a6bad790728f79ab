"""Check committed shards against their commit records.

`check_shard` is the one place that decides whether a shard is intact: the writer uses it to
skip committed work, the reader and trainer to refuse a corrupt shard, and `verify_store` (the
`kdcache verify` command) to re-hash a whole store and name every bad shard and file.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from kdstore.errors import CorruptShardError
from kdstore.location import Location
from kdstore.reader import StoreReader
from kdstore.records import (
    COMMIT_JSON,
    SHARDS_DIR,
    CommitRecord,
    read_commit,
    read_store_meta,
    sha256_of,
)

CHECKS = ("hash", "size")


@dataclass(frozen=True)
class Problem:
    shard: str
    file: str | None
    message: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f", file {self.file}" if self.file else "")
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    store: str
    shards_checked: int
    problems: tuple[Problem, ...]
    leftovers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems})


def check_shard(
    location: Location, shard_id: str, fingerprint: str, check: str = "hash"
) -> tuple[list[Problem], CommitRecord | None]:
    """Problems of one shard (empty when intact) and its record (None when not committed)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not location.exists(SHARDS_DIR, shard_id, COMMIT_JSON):
        if location.exists(SHARDS_DIR, shard_id):
            return [Problem(shard_id, COMMIT_JSON, "missing: the shard has files but no commit record")], None
        return [], None
    try:
        record = read_commit(location, shard_id)
    except CorruptShardError as exc:
        return [Problem(shard_id, COMMIT_JSON, str(exc))], None
    problems = []
    if record.fingerprint != fingerprint:
        problems.append(
            Problem(shard_id, COMMIT_JSON, f"written for fingerprint {record.fingerprint}, the store's is {fingerprint}")
        )
    if record.shard_id != shard_id:
        problems.append(Problem(shard_id, COMMIT_JSON, f"records shard id {record.shard_id!r}"))
    on_disk = location.walk_files(SHARDS_DIR, shard_id)
    on_disk.pop(COMMIT_JSON, None)
    for rel, expected in sorted(record.files.items()):
        size = on_disk.pop(rel, None)
        if size is None:
            problems.append(Problem(shard_id, rel, "missing"))
        elif size != expected.bytes:
            problems.append(Problem(shard_id, rel, f"{size} bytes, the commit record says {expected.bytes} (truncated or altered)"))
        elif check == "hash":
            actual = sha256_of(location.fs.open, location.path(SHARDS_DIR, shard_id, rel))
            if actual != expected.sha256:
                problems.append(Problem(shard_id, rel, f"sha256 {actual[:16]}… differs from the commit record's {expected.sha256[:16]}… (altered)"))
    for rel in sorted(on_disk):
        problems.append(Problem(shard_id, rel, "not listed in the commit record"))
    return problems, record


def verify_store(url: str, check: str = "hash") -> VerifyReport:
    """Re-check every shard of a store (plus uncommitted shard dirs and duplicate sample ids)."""
    location = Location.of(url)
    meta = read_store_meta(location)
    problems: list[Problem] = []
    leftovers = []
    names = location.list_dirs(SHARDS_DIR)
    checked = 0
    ranges = []
    for name in names:
        if name.startswith("."):
            leftovers.append(posixpath.join(SHARDS_DIR, name))
            continue
        checked += 1
        shard_problems, record = check_shard(location, name, meta.fingerprint, check)
        problems.extend(shard_problems)
        if record is not None and not shard_problems:
            ranges.append((record.sample_id_min, record.sample_id_max, name))
    problems.extend(_overlapping_sample_ids(url, ranges))
    return VerifyReport(url, checked, tuple(problems), tuple(leftovers))


def _overlapping_sample_ids(url: str, ranges: list[tuple[int, int, str]]) -> list[Problem]:
    """Shards whose sample-id ranges overlap are read to find real duplicates."""

    ranges.sort()
    suspects = set()
    reach, reach_shard = -1, ""
    for lo, hi, shard in ranges:
        if lo <= reach:
            suspects.update((shard, reach_shard))
        if hi > reach:
            reach, reach_shard = hi, shard
    if not suspects:
        return []
    reader = StoreReader(url)
    seen: dict[int, str] = {}
    problems = []
    for shard in sorted(suspects):
        for sid in reader.read_shard(shard, ["sample_id"])["sample_id"].tolist():
            if sid in seen:
                problems.append(Problem(shard, None, f"sample_id {sid} is also in shard {seen[sid]}"))
            seen[sid] = shard
    return problems
