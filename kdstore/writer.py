"""Write shards: one shard = one commit, no coordination between writers.

A shard is encoded into a private staging directory, every file is hashed, the commit record
is written last, and the directory is published by an atomic rename (local stores) or by
uploading the files and then the commit record (object stores). Readers see only directories
with a commit record, so a crash leaves nothing half-visible; its leftovers (`.tmp-*`) are
removed by `cleanup_stale`. A committed, valid shard is never rewritten.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as safetensors_save

from kdstore.digest import digest_file
from kdstore.errors import FingerprintMismatchError, ShardDataError, StoreError, StoreWriteError
from kdstore.fields import check_rows, fields_for_spec
from kdstore.location import Location
from kdstore.records import (
    COMMIT_JSON,
    COMMIT_JSON_INDENT,
    SAMPLE_ID_HASH,
    SHARDS_DIR,
    STORE_JSON,
    STORE_JSON_INDENT,
    TEACHER_DIR,
    CommitRecord,
    FileRecord,
    StoreMeta,
    TeacherRecord,
    json_bytes,
    read_store_meta,
    sample_id_hash,
)
from kdstore.shard_io import write_shard_files
from kdstore.spec import Provenance, StoreSpec, canonical_json
from kdstore.verify import check_shard

_SHARD_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
TMP_PREFIX = ".tmp-"
QUARANTINE_PREFIX = ".corrupt-"
RETIRED_PREFIX = ".retired-"
LOCAL_STAGE_PREFIX = "kdcache-stage@"


@dataclass(frozen=True)
class WriteResult:
    record: CommitRecord
    skipped: bool  # True when a valid commit already existed and nothing was written


class StoreWriter:
    """Creates a store (or opens one with the same fingerprint) and commits shards to it."""

    def __init__(self, url: str | os.PathLike[str], spec: StoreSpec, provenance: Provenance):
        self.location = Location.of(url)
        self.meta = StoreMeta.new(spec, provenance)
        self._open_or_create()

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    def _open_or_create(self) -> None:
        if not self.location.exists(STORE_JSON):
            self.location.write_bytes(json_bytes(self.meta.to_json(), STORE_JSON_INDENT), STORE_JSON)
        existing = read_store_meta(self.location)  # re-read: a racing creator may have won
        if existing.fingerprint != self.meta.fingerprint:
            raise FingerprintMismatchError(
                f"store {self.location.url!r} has fingerprint {existing.fingerprint}, this writer "
                f"{self.meta.fingerprint}; they differ in {_differences(existing, self.meta)}. "
                "A different teacher, tokenizer, corpus or spec needs a new store."
            )
        if existing.fields != fields_for_spec(existing.spec, existing.format_version):
            raise StoreError(f"store {self.location.url!r}: store.json's field layout is not what its spec and "
                             f"format version {existing.format_version} imply (altered); `kdcache verify` names "
                             "the fields. No shard was written.")
        self.meta = existing  # an older format's store gets shards in its own layout

    # ------------------------------------------------------------ shards

    def committed(self, shard_id: str, check: str = "hash") -> CommitRecord | None:
        """The commit record of a committed shard that passes `check` ("hash" or "size")."""
        problems, record = check_shard(self.location, shard_id, self.meta.fingerprint, check)
        return record if record is not None and not problems else None

    def write_shard(
        self,
        shard_id: str,
        rows: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
        *,
        skip_committed: bool = True,
        check: str = "hash",
    ) -> WriteResult:
        if not _SHARD_ID.match(shard_id):
            raise ShardDataError(f"shard id {shard_id!r} must match {_SHARD_ID.pattern}")
        if skip_committed and (done := self.committed(shard_id, check)) is not None:
            return WriteResult(done, skipped=True)
        spec = self.meta.spec
        n_rows = check_rows(self.meta.fields, rows, f"shard {shard_id!r}")
        if n_rows > spec.shard_rows:
            raise ShardDataError(f"shard {shard_id!r} has {n_rows} rows; the spec allows {spec.shard_rows}")
        stage = None
        try:
            stage = self._stage_dir(shard_id)
            try:
                write_shard_files(stage, self.meta.fields, rows, spec.zstd_level, spec.record_batch_rows)
            except ShardDataError as exc:  # a value out of range for its stored dtype
                raise ShardDataError(f"shard {shard_id!r}: {exc}") from exc
            record = self._record(shard_id, stage, rows, n_rows, meta or {})
            _write_synced(stage / COMMIT_JSON, json_bytes(record.to_json(), COMMIT_JSON_INDENT))
            return self._publish(shard_id, stage, record)
        except OSError as exc:
            if not out_of_space(exc):
                raise
            where = "its local staging folder" if not self.location.is_local else "the store's disk"
            raise StoreWriteError(f"store {self.location.url!r}, shard {shard_id}: no space left on {where} "
                                  f"({_one_line(exc)}); the staged shard was removed and committed shards are "
                                  "kept: free space (`kdcache plan` estimates what the pass needs) and re-run, "
                                  "it resumes here") from exc
        finally:
            if stage is not None and stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _stage_dir(self, shard_id: str) -> Path:
        if self.location.is_local:
            name = f"{TMP_PREFIX}{shard_id}@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
            path = self.location.local_path(SHARDS_DIR, name)
            path.mkdir(parents=True)
            return path
        # object stores stage locally; the pid in the name lets cleanup_stale remove a killed writer's
        return Path(tempfile.mkdtemp(prefix=f"{LOCAL_STAGE_PREFIX}{os.getpid()}@{shard_id}@"))

    def _record(
        self, shard_id: str, stage: Path, rows: Mapping[str, np.ndarray], n_rows: int, meta: Mapping[str, Any]
    ) -> CommitRecord:
        files = {}
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            _fsync(path)
            files[path.relative_to(stage).as_posix()] = FileRecord(path.stat().st_size, digest_file(open, str(path)))
        valid = np.asarray(rows["valid"], dtype=bool)
        stats: dict[str, float] = {}
        if "topk_tail" in rows:
            stats["kept_mass_sum"] = float((1.0 - np.asarray(rows["topk_tail"], dtype=np.float64))[valid].sum())
        if "loss_mask" in rows:
            stats["loss_tokens"] = int(np.asarray(rows["loss_mask"], dtype=bool).sum())
        sample_ids = np.asarray(rows["sample_id"])
        stats[SAMPLE_ID_HASH] = sample_id_hash(sample_ids)
        return CommitRecord(
            shard_id=shard_id,
            fingerprint=self.meta.fingerprint,
            format_version=self.meta.format_version,
            rows=n_rows,
            tokens=n_rows * self.meta.spec.row_length,
            valid_tokens=int(valid.sum()),
            sample_id_min=int(sample_ids.min()),
            sample_id_max=int(sample_ids.max()),
            files=files,
            stats=stats,
            meta=dict(meta),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def _publish(self, shard_id: str, stage: Path, record: CommitRecord) -> WriteResult:
        loc = self.location
        if loc.is_local:
            final = loc.local_path(SHARDS_DIR, shard_id)
            try:
                os.rename(stage, final)
                _fsync_dir(final.parent)
                return WriteResult(record, skipped=False)
            except OSError:
                if not final.exists():
                    raise
            # Someone else committed this shard meanwhile, or a broken one is in the way.
            if (done := self.committed(shard_id)) is not None:
                return WriteResult(done, skipped=True)
            os.rename(final, final.with_name(f"{QUARANTINE_PREFIX}{shard_id}-{uuid.uuid4().hex[:8]}"))
            os.rename(stage, final)
            return WriteResult(record, skipped=False)
        target = loc.path(SHARDS_DIR, shard_id)
        try:
            if loc.fs.exists(target):
                loc.fs.rm(target, recursive=True)
            for rel in record.files:
                loc.fs.makedirs(os.path.dirname(f"{target}/{rel}"), exist_ok=True)
                loc.fs.put_file(str(stage / rel), f"{target}/{rel}")
            loc.fs.put_file(str(stage / COMMIT_JSON), f"{target}/{COMMIT_JSON}")  # last: the commit
        except Exception as exc:  # the object store's client raises its own types (botocore, aiohttp, OSError)
            try:  # without its commit record the partial upload is invisible; remove it where possible
                loc.fs.rm(target, recursive=True)
            except Exception:
                pass
            raise StoreWriteError(f"store {loc.url!r}, shard {shard_id}: upload failed ({type(exc).__name__}: "
                                  f"{_one_line(exc)}); nothing was committed for this shard and committed shards "
                                  "are kept: check the bucket, credentials and network, then re-run (it resumes "
                                  "here)") from exc
        return WriteResult(record, skipped=False)

    def retire_shard(self, shard_id: str) -> str:
        """Move a committed shard out of sight (`.retired-*`): its rows leave the store, its bytes stay."""
        name = f"{RETIRED_PREFIX}{shard_id}-{uuid.uuid4().hex[:8]}"
        self.location.fs.mv(self.location.path(SHARDS_DIR, shard_id), self.location.path(SHARDS_DIR, name), recursive=True)
        return name

    def cleanup_stale(self, max_age_s: float = 6 * 3600) -> list[str]:
        """Remove leftovers of crashed writers: staging dirs of dead local processes, or old ones."""
        removed = []
        host = socket.gethostname()
        for name in self.location.list_dirs(SHARDS_DIR):
            if not name.startswith(TMP_PREFIX):
                continue
            path = self.location.path(SHARDS_DIR, name)
            if _is_dead_local_writer(name, host) or _age_s(self.location, path) > max_age_s:
                self.location.fs.rm(path, recursive=True)
                removed.append(name)
        if not self.location.is_local:
            removed += _remove_dead_local_stages()
        return removed

    # ------------------------------------------------------------ teacher tensors

    def write_teacher_tensors(self, name: str, tensors: Mapping[str, np.ndarray]) -> str:
        """Save tensors once under teacher/<name>.safetensors (never pickle); returns the path."""
        data = safetensors_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        return self._write_teacher_file(f"{name}.safetensors", data)

    def write_teacher_file(self, name: str, data: bytes) -> str:
        return self._write_teacher_file(name, data)

    def teacher_committed(self) -> bool:
        return self.location.exists(TEACHER_DIR, COMMIT_JSON)

    def commit_teacher(self) -> str:
        """Hash every file of teacher/ into teacher/COMMIT.json (written last: the marker that
        teacher/ is complete, and the checklist `verify` re-hashes)."""
        files = {rel: FileRecord(size, digest_file(self.location.fs.open, self.location.path(TEACHER_DIR, rel)))
                 for rel, size in sorted(self.location.walk_files(TEACHER_DIR).items()) if rel != COMMIT_JSON}
        record = TeacherRecord(self.meta.fingerprint, files)
        self.location.write_bytes(json_bytes(record.to_json(), COMMIT_JSON_INDENT), TEACHER_DIR, COMMIT_JSON)
        return self.location.path(TEACHER_DIR, COMMIT_JSON)

    def _write_teacher_file(self, name: str, data: bytes) -> str:
        if self.location.exists(TEACHER_DIR, name):
            if self.location.read_bytes(TEACHER_DIR, name) != data:
                raise StoreError(f"{self.location.path(TEACHER_DIR, name)} exists with other contents")
        else:
            try:
                self.location.write_bytes(data, TEACHER_DIR, name)
            except OSError as exc:
                if not out_of_space(exc):
                    raise
                raise StoreWriteError(f"store {self.location.url!r}, file {TEACHER_DIR}/{name}: no space left on the "
                                      f"store's disk ({_one_line(exc)}): free space and re-run") from exc
        return self.location.path(TEACHER_DIR, name)


def _differences(a: StoreMeta, b: StoreMeta) -> str:
    diffs = []
    for part in ("spec", "provenance"):
        da, db = a.to_json()[part], b.to_json()[part]
        for key in sorted(set(da) | set(db)):
            if canonical_json(da.get(key)) != canonical_json(db.get(key)):
                diffs.append(f"{part}.{key} ({da.get(key)!r} vs {db.get(key)!r})")
    return "; ".join(diffs) or "(identical content, different fingerprint: store.json was edited)"


def out_of_space(exc: BaseException) -> bool:
    """Whether an error means the disk (or quota) is full; Arrow's IO errors carry no errno."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        text in str(exc) for text in ("No space left on device", "Disk quota exceeded"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # some filesystems refuse fsync on directories


def _is_dead_local_writer(name: str, host: str) -> bool:
    parts = name[len(TMP_PREFIX) :].split("@")
    if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_dead_local_stages() -> list[str]:
    """Local staging dirs (object-store writes) of writer processes on this host that are gone."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{LOCAL_STAGE_PREFIX}*"):
        pid = path.name[len(LOCAL_STAGE_PREFIX):].split("@", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age_s(location: Location, path: str) -> float:
    try:
        modified = location.fs.modified(path)
    except (NotImplementedError, FileNotFoundError, OSError):
        return 0.0
    return time.time() - modified.timestamp()
