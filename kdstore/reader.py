"""Read a store: committed shards, column projection, random access by sample id, in bulk.

Everything needed to decode comes from `store.json` (field layout and codec chains). Every file
is read once into memory and checked against its shard's COMMIT.json (size and digest) before a
byte of it is decoded, so no altered byte reaches a caller; a file that is missing, truncated,
altered or unreadable is a CorruptShardError naming store, shard and file. Reads decode whole
record batches (or whole zarr shards) with vectorised numpy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import zarr
from safetensors.numpy import load as safetensors_load

from kdstore.digest import digest_bytes, file_key, known_good, remember_good
from kdstore.errors import CorruptShardError, FingerprintMismatchError, MissingFieldError
from kdstore.fields import ZARR, Field
from kdstore.location import Location
from kdstore.records import (
    COMMIT_JSON,
    SHARDS_DIR,
    TEACHER_DIR,
    CommitRecord,
    committed_shard_ids,
    read_commit,
    read_store_meta,
    read_teacher_record,
)
from kdstore.shard_io import DENSE_DIR, arrow_file, decode_arrow_batches, decode_dense


class StoreReader:
    def __init__(self, url: str | os.PathLike[str]):
        self.location = Location.of(url)
        self.meta = read_store_meta(self.location)
        self._shard_ids: list[str] | None = None
        self._records: dict[str, CommitRecord] = {}
        self._index: dict[int, tuple[str, int]] | None = None  # built shard by shard, as ids are asked for
        self._ids_of: dict[str, np.ndarray] = {}  # shard -> its sample ids, for the shards indexed

    @property
    def spec(self):
        return self.meta.spec

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.meta.fields]

    def shard_ids(self, refresh: bool = False) -> list[str]:
        if self._shard_ids is None or refresh:
            self._shard_ids = committed_shard_ids(self.location)
            self._index = None
        return list(self._shard_ids)

    def record(self, shard_id: str) -> CommitRecord:
        if shard_id not in self._records:
            record = read_commit(self.location, shard_id)
            if record.fingerprint != self.fingerprint:
                raise FingerprintMismatchError(
                    f"shard {shard_id} of {self.location.url!r} was written for fingerprint "
                    f"{record.fingerprint}, the store's is {self.fingerprint}"
                )
            self._records[shard_id] = record
        return self._records[shard_id]

    def num_rows(self) -> int:
        return sum(self.record(s).rows for s in self.shard_ids())

    def resolve(self, names: Iterable[str] | None) -> list[Field]:
        if names is None:
            return list(self.meta.fields)
        by_name = {f.name: f for f in self.meta.fields}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MissingFieldError(
                f"store {self.location.url!r} has no field(s) {missing}; it holds {sorted(by_name)}"
            )
        return [by_name[n] for n in names]

    # ------------------------------------------------------------ bulk reads

    def read_shard(
        self, shard_id: str, fields: Sequence[str] | None = None, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Decode the named fields of one shard (all rows, or the given row positions)."""
        wanted = self.resolve(fields)
        record = self.record(shard_id)
        if rows is not None:
            rows = np.asarray(rows)
            if rows.size == 0:
                return _empty(wanted)
            if rows.min() < 0 or rows.max() >= record.rows:  # not corruption: a bad request
                raise IndexError(f"shard {shard_id} has rows 0..{record.rows - 1}; asked for {rows.min()}..{rows.max()}")
        out: dict[str, np.ndarray] = {}
        groups: dict[str, list[Field]] = {}
        for f in self.meta.fields:
            if f.container != ZARR:
                groups.setdefault(f.group, []).append(f)
        for group, group_fields in groups.items():
            names = [f.name for f in wanted if f.group == group]
            if names:
                out.update(self._read_arrow(shard_id, group, group_fields, names, record, rows))
        dense = [f for f in wanted if f.container == ZARR]
        if dense:
            out.update(self._read_dense(shard_id, dense, record, rows))
        return {f.name: out[f.name] for f in wanted}

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for shard_id in self.shard_ids():
            yield shard_id, self.read_shard(shard_id, fields)

    def _read_arrow(
        self,
        shard_id: str,
        group: str,
        group_fields: list[Field],
        names: list[str],
        record: CommitRecord,
        rows: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        name = arrow_file(group)
        source = self._arrow_source(shard_id, name, record, whole=rows is None)
        try:
            reader = pa.ipc.open_file(source)
            per_batch = self.spec.record_batch_rows
            if rows is None:
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                decoded = decode_arrow_batches(batches, group_fields, names)
            else:
                needed = np.unique(np.asarray(rows) // per_batch)
                batches = [reader.get_batch(int(i)) for i in needed]
                decoded = decode_arrow_batches(batches, group_fields, names)
                starts = np.concatenate([[0], np.cumsum([b.num_rows for b in batches])[:-1]])
                local = starts[np.searchsorted(needed, np.asarray(rows) // per_batch)] + np.asarray(rows) % per_batch
                decoded = {k: v[local] for k, v in decoded.items()}
        except (OSError, pa.ArrowException, ValueError, KeyError, IndexError) as exc:
            raise CorruptShardError(f"{self._where(shard_id, name)}: cannot be read ({exc})") from exc
        n = record.rows if rows is None else len(rows)
        for key, value in decoded.items():
            if len(value) != n:
                raise CorruptShardError(f"{self._where(shard_id, name)}: {len(value)} rows of {key}, commit says {n}")
        return decoded

    def _where(self, shard_id: str, rel: str) -> str:
        return f"store {self.location.url!r}, shard {shard_id}, file {rel}"

    def _arrow_source(self, shard_id: str, name: str, record: CommitRecord, whole: bool):
        """A whole read: the file's bytes, checked. A row subset of a local file already checked
        in this process: a memory map, so only the record batches asked for are read."""
        if not whole and self.location.is_local and (expected := record.files.get(name)) is not None:
            path = str(self.location.local_path(SHARDS_DIR, shard_id, name))
            try:
                if known_good(file_key(path, expected.digest, os.stat(path))):
                    return pa.memory_map(path)
            except OSError:
                pass  # missing: checked_bytes names it
        return pa.BufferReader(self.checked_bytes(shard_id, name, record))

    def checked_bytes(self, shard_id: str, rel: str, record: CommitRecord | None = None) -> bytes:
        """The bytes of one file of a shard, read once and checked against the shard's
        COMMIT.json (size, then digest) before anything decodes them (see `kdstore.digest`)."""
        record = record or self.record(shard_id)
        expected = record.files.get(rel)
        where = self._where(shard_id, rel)
        if expected is None:
            raise CorruptShardError(f"{where}: not listed in the shard's {COMMIT_JSON}")
        path = self.location.path(SHARDS_DIR, shard_id, rel)
        try:
            if self.location.is_local:
                with open(path, "rb") as fh:
                    stat = os.fstat(fh.fileno())  # of the file read, not of one replaced since
                    data = fh.read()
            else:
                stat, data = None, self.location.read_bytes(SHARDS_DIR, shard_id, rel)
        except FileNotFoundError:
            raise CorruptShardError(f"{where}: missing (run `kdcache verify`)") from None
        except OSError as exc:
            raise CorruptShardError(f"{where}: cannot be read ({exc})") from exc
        if len(data) != expected.bytes:
            raise CorruptShardError(f"{where}: {len(data)} bytes, its {COMMIT_JSON} says {expected.bytes} "
                                    "(truncated or altered; run `kdcache verify`)")
        key = file_key(path, expected.digest, stat)
        if not known_good(key):
            actual = digest_bytes(expected.algorithm, data)
            if actual != expected.digest:
                raise CorruptShardError(f"{where}: {expected.algorithm} {actual[:16]}… differs from its "
                                        f"{COMMIT_JSON}'s {expected.digest[:16]}… (altered; run `kdcache verify`)")
            remember_good(key)
        return data

    def _read_dense(
        self, shard_id: str, dense: list[Field], record: CommitRecord, rows: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Every listed file of the wanted arrays (and the group's metadata) is read and checked
        first, then zarr decodes from memory: a missing chunk never reads as fill values."""
        from zarr.core.buffer import cpu

        prefixes = tuple(f"{DENSE_DIR}/{name}/" for f in dense for name in (f.name, f"{f.name}_scale"))
        top = f"{DENSE_DIR}/zarr.json"
        wanted = sorted(rel for rel in record.files if rel == top or rel.startswith(prefixes))
        if top not in wanted:
            raise CorruptShardError(f"{self._where(shard_id, top)}: not listed in the shard's {COMMIT_JSON}")
        data = {rel[len(DENSE_DIR) + 1:]: cpu.Buffer.from_bytes(self.checked_bytes(shard_id, rel, record))
                for rel in wanted}
        try:
            group = zarr.open_group(zarr.storage.MemoryStore(data, read_only=True), mode="r", zarr_format=3)
            return {f.name: decode_dense(group, f, rows) for f in dense}
        except CorruptShardError:
            raise
        except Exception as exc:  # zarr raises many types for missing/corrupt chunks
            raise CorruptShardError(f"{self._where(shard_id, DENSE_DIR)}: cannot be read ({exc!r})") from exc

    # ------------------------------------------------------------ random access

    def read_samples(self, sample_ids: Sequence[int], fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows by sample id, in the order asked (only the record batches that hold them). Only
        the shards whose commit records' sample-id ranges hold an asked id are looked into."""
        ids = [int(s) for s in sample_ids]
        if not ids:
            return _empty(self.resolve(fields))
        index = self._sample_index(np.asarray(ids, dtype=np.int64))
        unknown = [s for s in ids if s not in index]
        if unknown:
            raise KeyError(f"sample id(s) {unknown[:5]} not in store {self.location.url!r}")
        by_shard: dict[str, list[int]] = {}
        for pos, sid in enumerate(ids):
            by_shard.setdefault(index[sid][0], []).append(pos)
        parts: dict[str, np.ndarray] = {}
        for shard, positions in by_shard.items():
            local = np.array([index[ids[p]][1] for p in positions])
            for name, value in self.read_shard(shard, fields, rows=local).items():
                if name not in parts:
                    parts[name] = np.empty((len(ids), *value.shape[1:]), dtype=value.dtype)
                parts[name][positions] = value
        return parts

    def sample_ids(self) -> np.ndarray:
        """Every committed sample id (int64, in shard order): reads every shard's ids."""
        self._sample_index(None)
        return np.concatenate([self._ids_of[s] for s in self.shard_ids()] or [np.zeros(0, np.int64)])

    def _sample_index(self, wanted: np.ndarray | None) -> dict[int, tuple[str, int]]:
        """sample id -> (shard, row) for the shards that may hold `wanted` (None: every shard),
        read once each: a shard is a candidate when its record's [min, max] range holds one."""
        committed = self.shard_ids()  # first: a first listing starts the index afresh
        if self._index is None:
            self._index, self._ids_of = {}, {}
        shards = [s for s in committed if s not in self._ids_of]
        if wanted is not None and shards:
            unknown = np.unique(wanted[[int(s) not in self._index for s in wanted]])
            lo = np.array([self.record(s).sample_id_min for s in shards])
            hi = np.array([self.record(s).sample_id_max for s in shards])
            holds = np.searchsorted(unknown, lo, "left") < np.searchsorted(unknown, hi, "right")
            shards = [s for s, h in zip(shards, holds, strict=True) if h]
        for shard in shards:
            ids = self.read_shard(shard, ["sample_id"])["sample_id"].astype(np.int64)
            self._ids_of[shard] = ids
            for row, sid in enumerate(ids.tolist()):
                self._index.setdefault(sid, (shard, row))
        return self._index

    # ------------------------------------------------------------ teacher tensors

    def read_teacher_tensors(self, name: str) -> dict[str, np.ndarray]:
        """Tensors under teacher/, checked against teacher/COMMIT.json where the store has one."""
        rel = f"{name}.safetensors"
        path = self.location.path(TEACHER_DIR, rel)
        try:
            data = self.location.read_bytes(TEACHER_DIR, rel)
        except FileNotFoundError:
            raise MissingFieldError(f"store {self.location.url!r} has no teacher tensors {name!r} ({path} is missing)") from None
        try:
            record = read_teacher_record(self.location)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptShardError(f"{self.location.path(TEACHER_DIR, COMMIT_JSON)} is not a valid commit record ({exc})") from exc
        if record is not None:
            expected = record.files.get(rel)
            if expected is None or digest_bytes(expected.algorithm, data) != expected.digest:
                raise CorruptShardError(f"{path} does not match teacher/{COMMIT_JSON} (altered or truncated): "
                                        "run `kdcache verify`")
        return safetensors_load(data)


def _empty(fields: Sequence[Field]) -> dict[str, np.ndarray]:
    return {f.name: np.empty((0, *f.shape), dtype=f.decoded_dtype) for f in fields}
