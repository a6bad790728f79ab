"""Read a store: committed shards, column projection, random access by sample id, in bulk.

Everything needed to decode comes from `store.json` (field layout and codec chains). Reads
decode whole record batches (or whole zarr shards) with vectorised numpy; a file that is
missing, truncated or unreadable is reported as a CorruptShardError naming shard and file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import zarr
from safetensors.numpy import load as safetensors_load

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
        self._index: dict[int, tuple[str, int]] | None = None

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
            self._check_dense_files(shard_id, dense, record)
            out.update(self._read_dense(shard_id, dense, rows))
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
        try:
            reader = pa.ipc.open_file(self._source(shard_id, name))
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
            raise CorruptShardError(f"shard {shard_id}, file {name}: cannot be read ({exc})") from exc
        n = record.rows if rows is None else len(rows)
        for key, value in decoded.items():
            if len(value) != n:
                raise CorruptShardError(f"shard {shard_id}, file {name}: {len(value)} rows of {key}, commit says {n}")
        return decoded

    def _source(self, shard_id: str, name: str):
        if self.location.is_local:
            return pa.memory_map(str(self.location.local_path(SHARDS_DIR, shard_id, name)))
        return pa.BufferReader(self.location.read_bytes(SHARDS_DIR, shard_id, name))

    def _read_dense(self, shard_id: str, dense: list[Field], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        try:
            group = zarr.open_group(self._zarr_store(shard_id), mode="r", zarr_format=3)
            return {f.name: decode_dense(group, f, rows) for f in dense}
        except CorruptShardError:
            raise
        except Exception as exc:  # zarr raises many types for missing/corrupt chunks
            raise CorruptShardError(f"shard {shard_id}, file {DENSE_DIR}: cannot be read ({exc!r})") from exc

    def _check_dense_files(self, shard_id: str, dense: list[Field], record: CommitRecord) -> None:
        """zarr reads a missing chunk file as fill values (zeros): check presence and size."""
        prefixes = tuple(f"{DENSE_DIR}/{name}/" for f in dense for name in (f.name, f"{f.name}_scale"))
        expected = {rel: r.bytes for rel, r in record.files.items() if rel.startswith(prefixes)}
        if self.location.is_local:
            sizes = {}
            for rel in expected:
                try:
                    sizes[rel] = os.path.getsize(self.location.local_path(SHARDS_DIR, shard_id, rel))
                except OSError:
                    pass
        else:
            found = self.location.walk_files(SHARDS_DIR, shard_id, DENSE_DIR)
            sizes = {f"{DENSE_DIR}/{rel}": size for rel, size in found.items()}
        for rel, size in sorted(expected.items()):
            if rel not in sizes:
                raise CorruptShardError(f"shard {shard_id}, file {rel}: missing")
            if sizes[rel] != size:
                raise CorruptShardError(
                    f"shard {shard_id}, file {rel}: {sizes[rel]} bytes, the commit record says {size}"
                )

    def _zarr_store(self, shard_id: str):
        if self.location.is_local:
            path = self.location.local_path(SHARDS_DIR, shard_id, DENSE_DIR)
            if not path.exists():
                raise CorruptShardError(f"shard {shard_id}, file {DENSE_DIR}: missing")
            return zarr.storage.LocalStore(str(path), read_only=True)
        from zarr.core.buffer import cpu

        files = self.location.walk_files(SHARDS_DIR, shard_id, DENSE_DIR)
        base = self.location.path(SHARDS_DIR, shard_id, DENSE_DIR)
        data = {rel: cpu.Buffer.from_bytes(self.location.fs.cat_file(f"{base}/{rel}")) for rel in files}
        return zarr.storage.MemoryStore(data, read_only=True)

    # ------------------------------------------------------------ random access

    def read_samples(self, sample_ids: Sequence[int], fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows by sample id, in the order asked (only the record batches that hold them)."""
        index = self._sample_index()
        ids = [int(s) for s in sample_ids]
        if not ids:
            return _empty(self.resolve(fields))
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
        """Every committed sample id (int64, in shard order); builds the index `read_samples` uses."""
        return np.fromiter(self._sample_index(), dtype=np.int64)

    def _sample_index(self) -> dict[int, tuple[str, int]]:
        if self._index is None:
            index = {}
            for shard in self.shard_ids():
                for row, sid in enumerate(self.read_shard(shard, ["sample_id"])["sample_id"].tolist()):
                    index[sid] = (shard, row)
            self._index = index
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
            if expected is None or hashlib.sha256(data).hexdigest() != expected.sha256:
                raise CorruptShardError(f"{path} does not match teacher/{COMMIT_JSON} (altered or truncated): "
                                        "run `kdcache verify`")
        return safetensors_load(data)


def _empty(fields: Sequence[Field]) -> dict[str, np.ndarray]:
    return {f.name: np.empty((0, *f.shape), dtype=f.decoded_dtype) for f in fields}
