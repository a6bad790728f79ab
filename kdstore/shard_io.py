"""Encode one shard's rows into files, and decode files back into arrays.

Per-token sparse data goes to Arrow IPC files (one file per field group, zstd-compressed
buffers, record batches of `record_batch_rows` rows for random access); dense arrays go to one
Zarr v3 group (`dense.zarr`, one array per field, sharded: a single zarr shard per array, chunks
of one row, zstd). Plain pyarrow and zarr open every file; each file's metadata carries the
codec chain that turns the stored integers back into values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs

from kdstore.codecs import Int8RowScale, decode_chain, encode_chain
from kdstore.errors import ShardDataError
from kdstore.fields import ARROW, RAGGED, TEXT, ZARR, Field

DENSE_DIR = "dense.zarr"


def arrow_file(group: str) -> str:
    return f"{group}.arrow"


# ---------------------------------------------------------------- writing


def write_shard_files(
    directory: Path,
    fields: Sequence[Field],
    rows: Mapping[str, np.ndarray],
    zstd_level: int,
    record_batch_rows: int,
) -> None:
    """Write every field of `rows` under `directory` (a local staging folder)."""
    n_rows = len(rows["sample_id"])
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", zstd_level))
    for group, group_fields in _groups(fields, (ARROW, RAGGED, TEXT)).items():
        schema = pa.schema([_arrow_field(f) for f in _columns(group_fields)])
        with pa.OSFile(str(directory / arrow_file(group)), "wb") as sink:
            with pa.ipc.new_file(sink, schema, options=options) as writer:
                for start in range(0, n_rows, record_batch_rows):
                    stop = min(start + record_batch_rows, n_rows)
                    columns = _encode_group(group_fields, rows, start, stop)
                    writer.write_batch(pa.record_batch(columns, schema=schema))
    dense = [f for f in fields if f.container == ZARR]
    if dense:
        group = zarr.open_group(zarr.storage.LocalStore(str(directory / DENSE_DIR)), mode="w", zarr_format=3)
        for f in dense:
            for name, array in _encode_dense(f, np.asarray(rows[f.name])):
                chunks = (1, *array.shape[1:])
                stored = group.create_array(
                    name,
                    shape=array.shape,
                    dtype=array.dtype,
                    chunks=chunks,
                    shards=array.shape,
                    compressors=zarr.codecs.ZstdCodec(level=zstd_level),
                    attributes={"kdcache_field": f.to_json()},
                )
                stored[...] = array


def _groups(fields: Sequence[Field], containers: tuple[str, ...]) -> dict[str, list[Field]]:
    out: dict[str, list[Field]] = {}
    for f in fields:
        if f.container in containers:
            out.setdefault(f.group, []).append(f)
    return out


def _columns(group_fields: Sequence[Field]) -> list[Field]:
    if group_fields[0].container == RAGGED:
        return [_draw_count_field(group_fields[0]), *group_fields]
    return list(group_fields)


def _draw_count_field(like: Field) -> Field:
    """Per-token number of unique draws: the ragged group's row index."""
    return Field("draw_n", ARROW, like.shape[:-1], "uint8", "int32", (), "int", like.group)


def _arrow_field(f: Field) -> pa.Field:
    meta = {"kdcache_field": json.dumps(f.to_json())}
    if f.container == TEXT:
        return pa.field(f.name, pa.string(), nullable=False, metadata=meta)
    value_type = pa.from_numpy_dtype(np.dtype(f.stored_dtype))
    if f.container == RAGGED and f.name != "draw_n":
        return pa.field(f.name, pa.list_(value_type), nullable=False, metadata=meta)
    width = int(np.prod(f.shape)) if f.shape else 0
    arrow_type = pa.list_(value_type, width) if width else value_type
    return pa.field(f.name, arrow_type, nullable=False, metadata=meta)


def _encode_group(
    group_fields: Sequence[Field], rows: Mapping[str, np.ndarray], start: int, stop: int
) -> list[pa.Array]:
    if group_fields[0].container == RAGGED:
        return _encode_draws(group_fields, rows, start, stop)
    out = []
    for f in group_fields:
        if f.container == TEXT:
            out.append(pa.array([str(x) for x in rows[f.name][start:stop]], pa.string()))
            continue
        stored = _encode(f, np.asarray(rows[f.name][start:stop]))
        stored = np.ascontiguousarray(stored, dtype=f.stored_dtype)
        out.append(_fixed_list(stored, f))
    return out


def _fixed_list(stored: np.ndarray, f: Field) -> pa.Array:
    if not f.shape:
        return pa.array(stored)
    width = int(np.prod(f.shape))
    return pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), width)


def _encode_draws(
    group_fields: Sequence[Field], rows: Mapping[str, np.ndarray], start: int, stop: int
) -> list[pa.Array]:
    ids_field, counts_field = group_fields
    ids = np.asarray(rows[ids_field.name][start:stop])
    counts = np.asarray(rows[counts_field.name][start:stop])
    if (counts < 0).any():
        raise ShardDataError(f"field {counts_field.name!r}: negative counts")
    keep = counts > 0
    n_per_token = keep.sum(axis=-1).astype(np.uint8)
    n_per_row = n_per_token.reshape(len(ids), -1).sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(n_per_row)]).astype(np.int32)
    slot = np.arange(ids.shape[-1]) < n_per_token[..., None]  # each token's draws, packed at its front
    flat_ids = _encode_per_token(ids_field, ids, keep, slot)
    flat_counts = _encode_per_token(counts_field, counts, keep, slot)
    n_field = _draw_count_field(ids_field)
    return [
        _fixed_list(n_per_token, n_field),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_ids)),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_counts)),
    ]


def _encode_per_token(f: Field, padded: np.ndarray, keep: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """A ragged field's kept values, flat: packed at each token's front, encoded along the token's
    draws (a delta runs within one token), then flattened."""
    packed = np.zeros(padded.shape, dtype=padded.dtype)
    packed[slot] = padded[keep]
    return np.ascontiguousarray(_encode(f, packed)[slot], dtype=f.stored_dtype)


def _encode_dense(f: Field, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    codec = f.chain[0] if f.chain else None
    if isinstance(codec, Int8RowScale):
        q, scale = codec.encode_pair(array)
        return [(f.name, q), (f"{f.name}_scale", scale)]
    return [(f.name, np.ascontiguousarray(_encode(f, array), dtype=f.stored_dtype))]


def _encode(f: Field, array: np.ndarray) -> np.ndarray:
    """encode_chain, with a range error naming the field."""
    try:
        return encode_chain(f.chain, array)
    except ShardDataError as exc:
        raise ShardDataError(f"field {f.name!r}: {exc}") from exc


# ---------------------------------------------------------------- reading


def decode_arrow_batches(
    batches: Sequence[pa.RecordBatch], group_fields: Sequence[Field], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Decode the named fields of one Arrow group from whole record batches, in bulk."""
    n_rows = sum(b.num_rows for b in batches)
    wanted = [f for f in group_fields if f.name in names]
    if group_fields[0].container == RAGGED:
        return _decode_draws(batches, group_fields, wanted, n_rows)
    out: dict[str, np.ndarray] = {}
    for f in wanted:
        if f.container == TEXT:
            texts = np.empty(n_rows, dtype=object)
            texts[:] = [x for b in batches for x in b.column(f.name).to_pylist()]
            out[f.name] = texts
            continue
        dest = np.empty((n_rows, *f.shape), dtype=f.decoded_dtype)
        start = 0
        for batch in batches:
            column = batch.column(f.name)
            flat = column.values if f.shape else column
            stored = arrow_values(flat).reshape((batch.num_rows, *f.shape))
            dest[start : start + batch.num_rows] = decode_chain(f.chain, stored)
            start += batch.num_rows
        out[f.name] = dest
    return out


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
                pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
                pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def arrow_values(array: pa.Array) -> np.ndarray:
    """A null-free primitive Arrow array as a (read-only) numpy view of its buffer. pyarrow's own
    `to_numpy` imports pandas on its first call, a fraction of a second before any first batch."""
    if array.null_count or (array.type not in _NUMPY_TYPES and array.type != pa.bool_()):
        return array.to_numpy(zero_copy_only=False)
    data = array.buffers()[1]
    if array.type == pa.bool_():  # bit-packed, least significant bit first
        bits = np.unpackbits(np.frombuffer(data, np.uint8), count=array.offset + len(array), bitorder="little")
        return bits[array.offset:].view(bool)
    dtype = np.dtype(_NUMPY_TYPES[array.type])
    return np.frombuffer(data, dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _decode_draws(
    batches: Sequence[pa.RecordBatch], group_fields: Sequence[Field], wanted: Sequence[Field], n_rows: int
) -> dict[str, np.ndarray]:
    n_tokens = _draw_count_field(group_fields[0]).shape
    width = group_fields[0].shape[-1]
    n = np.concatenate(
        [arrow_values(b.column("draw_n").values) for b in batches]
    ).reshape(n_rows, *n_tokens)
    slot = np.arange(width) < n[..., None]  # padded [R, T, width] positions that hold a draw
    out = {}
    for f in wanted:
        flat = np.concatenate([arrow_values(b.column(f.name).values) for b in batches])
        packed = np.zeros((n_rows, *f.shape), dtype=f.stored_dtype)
        packed[slot] = flat
        dest = decode_chain(f.chain, packed).astype(f.decoded_dtype, copy=False)
        dest[~slot] = 0  # padding decodes to id 0, count 0 whatever the chain
        out[f.name] = dest
    return out


def decode_dense(group: zarr.Group, f: Field, rows: np.ndarray | None = None) -> np.ndarray:
    """Decode one dense field: every row, or the given row positions (any order)."""

    def load(name: str) -> np.ndarray:
        array = group[name]
        return array[...] if rows is None else array.oindex[np.asarray(rows)]

    codec = f.chain[0] if f.chain else None
    if isinstance(codec, Int8RowScale):
        return codec.decode_pair(load(f.name), load(f"{f.name}_scale"))
    return decode_chain(f.chain, load(f.name)).astype(f.decoded_dtype, copy=False)
