"""Check every file of a store: store.json, teacher/ and each committed shard.

`check_shard` is the one place that decides whether a shard is intact: the writer uses it to
skip committed work, the reader and trainer to refuse a corrupt shard, and `verify_store` (the
`kdcache verify` command) to re-hash a whole store and name every bad shard and file.
store.json is checked against itself (its fingerprint recomputed from spec + provenance, its
field layout against the one the spec implies, its bytes against their one serialisation), and
teacher/ against teacher/COMMIT.json. A file that belongs to none of these is named too.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kdstore import records
from kdstore.digest import digest_file, digest_local
from kdstore.errors import CorruptShardError, FormatVersionError, NotAStoreError, StoreError
from kdstore.fields import fields_for_spec
from kdstore.location import Location
from kdstore.reader import StoreReader
from kdstore.spec import fingerprint as spec_fingerprint

CHECKS = ("hash", "size", "record")  # record: the commit record alone, no file of the shard read or listed


@dataclass(frozen=True)
class Problem:
    shard: str | None  # None: a store-level file (store.json, teacher/..., a stray file)
    file: str | None
    message: str

    def __str__(self) -> str:
        if self.shard is None:
            return f"file {self.file}: {self.message}"
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
        return sorted({p.shard for p in self.problems if p.shard is not None})

    @property
    def bad_store_files(self) -> list[str]:
        """Bad files outside the shards (store.json, teacher/ files, stray files)."""
        return sorted({p.file or "" for p in self.problems if p.shard is None})


def check_shard(
    location: Location, shard_id: str, fingerprint: str | None, check: str = "hash"
) -> tuple[list[Problem], records.CommitRecord | None]:
    """Problems of one shard (empty when intact) and its record (None when not committed).
    `fingerprint` None (store.json unreadable): the shard is checked against its own record."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    try:
        raw = location.read_bytes(records.SHARDS_DIR, shard_id, records.COMMIT_JSON)
    except FileNotFoundError:
        if location.exists(records.SHARDS_DIR, shard_id):
            return [Problem(shard_id, records.COMMIT_JSON, "missing: the shard has files but no commit record")], None
        return [], None
    try:
        record, checksum = records.load_commit(raw, location, shard_id)
    except CorruptShardError as exc:
        return [Problem(shard_id, records.COMMIT_JSON, str(exc))], None
    problems = []
    if raw != records.json_bytes(record.to_json(checksum=checksum), records.COMMIT_JSON_INDENT):
        problems.append(Problem(shard_id, records.COMMIT_JSON, "its bytes differ from the record they parse to (altered)"))
    if fingerprint is not None and record.fingerprint != fingerprint:
        problems.append(
            Problem(shard_id, records.COMMIT_JSON, f"written for fingerprint {record.fingerprint}, the store's is {fingerprint}")
        )
    if record.shard_id != shard_id:
        problems.append(Problem(shard_id, records.COMMIT_JSON, f"records shard id {record.shard_id!r}"))
    if check != "record":
        problems += [Problem(shard_id, rel, message)
                     for rel, message in check_listed_files(location, (records.SHARDS_DIR, shard_id), record.files, check)]
    return problems, record


def check_listed_files(location: Location, folder: tuple[str, ...], files: Mapping[str, records.FileRecord],
                       check: str) -> list[tuple[str, str]]:
    """(file, problem) for each file a commit record lists that is missing, of another size or
    (check "hash") another digest, and for each file in the folder that it does not list."""
    commit = f"{records.TEACHER_DIR}/{records.COMMIT_JSON}" if folder == (records.TEACHER_DIR,) else records.COMMIT_JSON
    on_disk = location.walk_files(*folder)
    on_disk.pop(records.COMMIT_JSON, None)
    found = []
    for rel, expected in sorted(files.items()):
        size = on_disk.pop(rel, None)
        if size is None:
            found.append((rel, "missing"))
        elif size != expected.bytes:
            found.append((rel, f"{size} bytes, {commit} says {expected.bytes} (this file or {commit} truncated or altered)"))
        elif check == "hash":
            path = location.path(*folder, rel)
            actual = (digest_local(path, expected.algorithm) if location.is_local
                      else digest_file(location.fs.open, path, expected.algorithm))
            if actual != expected.digest:
                found.append((rel, f"{expected.algorithm} {actual[:16]}… differs from {commit}'s {expected.digest[:16]}… "
                                   f"(this file or {commit} altered)"))
    return found + [(rel, f"not listed in {commit}") for rel in sorted(on_disk)]


def check_shards(location: Location, names: list[str], fingerprint: str | None,
                 check: str) -> list[tuple[str, list[Problem], records.CommitRecord | None]]:
    """`check_shard` of every named shard: (shard, problems, record) in the order named. In
    parallel where that pays: digests release the GIL, and object-store reads overlap; a local
    commit record is read from the page cache in microseconds, and its parse holds the GIL."""
    if check == "record":
        workers = 1 if location.is_local else 16
    else:
        workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(names) < 2:
        return [(name, *check_shard(location, name, fingerprint, check)) for name in names]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
        checked = pool.map(lambda n: check_shard(location, n, fingerprint, check), names)
        return [(name, problems, record) for name, (problems, record) in zip(names, checked, strict=True)]


def _store_and_shards(location: Location) -> tuple[list[Problem], str | None, list[str], list[str]]:
    """store.json's problems and fingerprint, the store's shard dirs and its leftover (staging,
    quarantined) dirs: what `verify_store` and `check_structure` both start from."""
    problems, fingerprint = check_store_json(location)
    names = location.list_dirs(records.SHARDS_DIR)
    leftovers = [posixpath.join(records.SHARDS_DIR, n) for n in names if n.startswith(".")]
    return problems, fingerprint, [n for n in names if not n.startswith(".")], leftovers


def _not_a_store(location: Location) -> NotAStoreError:
    return NotAStoreError(f"no kdcache store at {location.url!r}: {location.path(records.STORE_JSON)} does not exist")


def verify_store(url: str, check: str = "hash") -> VerifyReport:
    """Re-check every file of a store: store.json, teacher/, every shard (plus uncommitted shard
    dirs, duplicate sample ids and files that belong nowhere)."""
    location = Location.of(url)
    top = location.walk_files() if location.exists() else {}
    if not top:
        raise _not_a_store(location)
    problems, fingerprint, names, leftovers = _store_and_shards(location)
    problems += check_teacher(location, fingerprint, check)
    problems += [Problem(None, rel, "not a file of a kdcache store (store.json, teacher/, shards/<id>/)")
                 for rel in sorted(top)
                 if rel != records.STORE_JSON and rel.split("/")[0] not in (records.SHARDS_DIR, records.TEACHER_DIR)]
    ranges = []
    for name, shard_problems, record in check_shards(location, names, fingerprint, check):
        problems.extend(shard_problems)
        if record is not None and not shard_problems:
            ranges.append((record.sample_id_min, record.sample_id_max, name))
    if fingerprint is not None:
        problems.extend(_overlapping_sample_ids(url, ranges))
    return VerifyReport(url, len(names), tuple(problems), tuple(leftovers))


def check_store_json(location: Location) -> tuple[list[Problem], str | None]:
    """Problems of store.json and the fingerprint the shards are checked against (None when
    store.json cannot be trusted: the shards are then checked against their own records only)."""
    try:
        raw = location.read_bytes(records.STORE_JSON)
    except FileNotFoundError:
        return [Problem(None, records.STORE_JSON, "missing: the store has files but no store.json")], None
    try:
        meta = records.read_store_meta(location)
    except FormatVersionError:
        raise  # not damage: a newer kdcache wrote it
    except StoreError as exc:
        return [Problem(None, records.STORE_JSON, str(exc))], None
    problems = []
    if meta.format_version < 1:
        problems.append(Problem(None, records.STORE_JSON, f"format_version {meta.format_version} is not a kdcache format"))
    recomputed = spec_fingerprint(meta.spec, meta.provenance)
    if recomputed != meta.fingerprint:
        problems.append(Problem(None, records.STORE_JSON, f"fingerprint {meta.fingerprint} does not match its spec + provenance "
                                                          f"({recomputed}): the spec or provenance was altered"))
    expected = {f.name: f for f in fields_for_spec(meta.spec, meta.format_version)}
    actual = {f.name: f for f in meta.fields}
    for name in sorted(expected.keys() | actual.keys()):
        if expected.get(name) != actual.get(name):
            problems.append(Problem(None, records.STORE_JSON, f"field {name!r} in the field layout differs from what the spec "
                                                              "implies (codec chain, dtype or shape altered)"))
    if not problems:
        rewritten = records.StoreMeta(meta.spec, meta.provenance, meta.fingerprint, meta.fields, meta.format_version)
        if raw != records.json_bytes(rewritten.to_json(), records.STORE_JSON_INDENT):
            problems.append(Problem(None, records.STORE_JSON, "its bytes differ from the store.json they parse to (altered)"))
    return problems, None if problems else meta.fingerprint


def check_structure(url: str) -> VerifyReport:
    """The check before training, reading no shard payload: store.json against its fingerprint,
    teacher/COMMIT.json, and every shard's COMMIT.json present and self-consistent (one small
    read per shard, in parallel). Payload bytes are checked as they are read (verify on read);
    `verify_store` is the full re-hash."""
    location = Location.of(url)
    if not location.exists(records.STORE_JSON):
        raise _not_a_store(location)
    problems, fingerprint, names, _ = _store_and_shards(location)
    problems += check_teacher(location, fingerprint, "record")
    for _, shard_problems, _ in check_shards(location, names, fingerprint, "record"):
        problems += shard_problems
    return VerifyReport(url, len(names), tuple(problems))


def check_teacher(location: Location, fingerprint: str | None, check: str = "hash") -> list[Problem]:
    """teacher/ against teacher/COMMIT.json: every listed file there and intact, nothing unlisted."""
    if not location.exists(records.TEACHER_DIR) or not location.walk_files(records.TEACHER_DIR):
        return []
    commit = f"{records.TEACHER_DIR}/{records.COMMIT_JSON}"
    try:
        record = records.read_teacher_record(location)
    except (ValueError, KeyError, TypeError) as exc:
        return [Problem(None, commit, f"not a valid commit record ({exc})")]
    if record is None:
        return [Problem(None, commit, "missing: teacher/ has files but no commit record (written by an older "
                                      "kdcache, or the pass was killed while writing teacher/: re-run the pass)")]
    problems = []
    if fingerprint is not None and record.fingerprint != fingerprint:
        problems.append(Problem(None, commit, f"written for fingerprint {record.fingerprint}, the store's is {fingerprint}"))
    if check != "record":
        problems += [Problem(None, f"{records.TEACHER_DIR}/{rel}", message)
                     for rel, message in check_listed_files(location, (records.TEACHER_DIR,), record.files, check)]
    return problems


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
