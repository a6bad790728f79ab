"""The fields a spec implies: name, container, per-row shape, codec chain.

`fields_for_spec` is the single place that decides the on-disk layout; `store.json` records its
result (`field_layout_to_json`), and readers rebuild the layout from that JSON, never from code
defaults, so an old store stays readable when defaults change.

Input arrays handed to the writer, per shard (R rows, T = row_length):
  sample_id [R] int, input_ids [R,T] int, doc_ids [R,T] int, valid [R,T] bool
  topk_ids [R,T,k] int, topk_logp [R,T,k] float (sorted descending, -inf = padding), topk_tail [R,T]
  draw_ids [R,T,n] int + draw_counts [R,T,n] int (count 0 = padding; n ≤ n_draws)
  tail_ids [R,T,n] int + tail_counts [R,T,n] int: the hybrid's tail draws (ids never in topk_ids;
  count 0 = padding, and a token whose tail is empty has none)
  hidden_<L> [R,T,d] float
  attn_<L> [R,H,T,T] float probabilities, or with attention.topk: attn_<L>_ids / attn_<L>_p [R,H,T,ka]
  text [R] str (the row's text: its tokens' pieces joined) + char_end [R,T] int (where in it each
  token ends; a token's piece starts where the previous one ends, special tokens are empty)
  loss_mask [R,T] bool (the tokens a student is trained on: a chat corpus's assistant tokens),
  stored as uint8 0/1 in its own zstd-compressed file: runs of 0s and 1s cost well under
  0.2 B/token
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdstore.codecs import (
    BFloat16,
    BytePlanes,
    Cast,
    Delta,
    FloatCast,
    Int8RowScale,
    LogQuant,
    ProbQuant,
    chain_from_json,
    chain_to_json,
)
from kdstore.errors import ShardDataError
from kdstore.spec import FORMAT_VERSION, StoreSpec, id_dtype_for_vocab

ARROW = "arrow"  # fixed-size per-token data, one Arrow row per sample
RAGGED = "ragged"  # variable-length per-token data (sampled draws), Arrow list columns
ZARR = "zarr"  # dense arrays, Zarr v3 sharded + zstd
TEXT = "text"  # one UTF-8 string per row, an Arrow string column


@dataclass(frozen=True)
class Field:
    name: str
    container: str
    shape: tuple[int, ...]  # per row
    stored_dtype: str
    decoded_dtype: str
    chain: tuple[Any, ...]
    kind: str  # what the writer accepts: "int", "float", "bool" or "str"
    group: str  # the file it lives in: <group>.arrow, or dense.zarr/<group> for zarr fields

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "container": self.container,
            "shape": list(self.shape),
            "stored_dtype": self.stored_dtype,
            "decoded_dtype": self.decoded_dtype,
            "codecs": chain_to_json(self.chain),
            "kind": self.kind,
            "group": self.group,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Field:
        return cls(
            name=data["name"],
            container=data["container"],
            shape=tuple(data["shape"]),
            stored_dtype=data["stored_dtype"],
            decoded_dtype=data["decoded_dtype"],
            chain=chain_from_json(data["codecs"]),
            kind=data["kind"],
            group=data["group"],
        )


def hidden_field(layer: int) -> str:
    return f"hidden_{layer}"


def attention_field(layer: int) -> str:
    return f"attn_{layer}"


def fields_for_spec(spec: StoreSpec, version: int = FORMAT_VERSION) -> tuple[Field, ...]:
    """The layout a store of format `version` has for `spec` (verify checks a store against its own
    version's). Version 2: top-k log-prob codes in byte planes, and each token's draw ids (unique,
    ascending) delta-coded, 9 % fewer bytes for the hybrid at k = 16 + 8."""
    T = spec.row_length
    planes: tuple[Any, ...] = (BytePlanes(),) if version >= 2 else ()
    id_deltas: tuple[Any, ...] = (Delta(),) if version >= 2 else ()
    ids = id_dtype_for_vocab(spec.vocab_size)
    out = [
        Field("sample_id", ARROW, (), "int64", "int64", (), "int", "tokens"),
        Field("input_ids", ARROW, (T,), ids, "int64", (Cast(ids, "int64"),), "int", "tokens"),
        Field("doc_ids", ARROW, (T,), "int32", "int32", (Cast("int32", "int32"),), "int", "tokens"),
        Field("valid", ARROW, (T,), "uint8", "bool", (Cast("uint8", "bool"),), "bool", "tokens"),
    ]
    if spec.topk is not None:
        k = spec.topk.k
        out.append(Field("topk_ids", ARROW, (T, k), ids, "int32", (Cast(ids, "int32"),), "int", "topk_ids"))
        if spec.topk.logp_step > 0:
            logp_chain: tuple[Any, ...] = (LogQuant(spec.topk.logp_step, "uint16"), Delta(), *planes)
            out.append(Field("topk_logp", ARROW, (T, k), "uint16", "float32", logp_chain, "float", "topk_logp"))
        else:
            out.append(Field("topk_logp", ARROW, (T, k), "float32", "float32", (), "float", "topk_logp"))
        out.append(Field("topk_tail", ARROW, (T,), "float32", "float32", (), "float", "topk_tail"))
    if spec.sampled is not None:
        n = spec.sampled.n_draws
        out.append(Field("draw_ids", RAGGED, (T, n), ids, "int32", (Cast(ids, "int32"), *id_deltas), "int", "draws"))
        out.append(Field("draw_counts", RAGGED, (T, n), "uint8", "int32", (Cast("uint8", "int32"),), "int", "draws"))
    if spec.tail_sample is not None:
        n = spec.tail_sample.n_draws
        out.append(Field("tail_ids", RAGGED, (T, n), ids, "int32", (Cast(ids, "int32"), *id_deltas), "int",
                         "tail_draws"))
        out.append(Field("tail_counts", RAGGED, (T, n), "uint8", "int32", (Cast("uint8", "int32"),), "int", "tail_draws"))
    if spec.hidden is not None:
        d = spec.hidden.width
        codec = {"float16": FloatCast("float16"), "bfloat16": BFloat16(), "int8": Int8RowScale()}[spec.hidden.dtype]
        stored = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}[spec.hidden.dtype]
        for layer in spec.hidden.layers:
            out.append(Field(hidden_field(layer), ZARR, (T, d), stored, "float32", (codec,), "float", hidden_field(layer)))
    if spec.attention is not None:
        a = spec.attention
        H = len(a.heads)
        for layer in a.layers:
            name = attention_field(layer)
            if a.topk is None:
                out.append(Field(name, ZARR, (H, T, T), a.dtype, "float32", (ProbQuant(a.dtype),), "float", name))
            else:
                pos = id_dtype_for_vocab(T)
                out.append(Field(f"{name}_ids", ZARR, (H, T, a.topk), pos, "int32", (Cast(pos, "int32"),), "int", f"{name}_ids"))
                out.append(Field(f"{name}_p", ZARR, (H, T, a.topk), a.dtype, "float32", (ProbQuant(a.dtype),), "float", f"{name}_p"))
    if spec.loss_mask:
        out.append(Field("loss_mask", ARROW, (T,), "uint8", "bool", (Cast("uint8", "bool"),), "bool", "loss_mask"))
    if spec.text:
        out.append(Field("text", TEXT, (), "utf8", "object", (), "str", "text"))
        out.append(Field("char_end", ARROW, (T,), "int32", "int32", (Delta(),), "int", "text"))
    return tuple(out)


def field_layout_to_json(fields: tuple[Field, ...]) -> list[dict[str, Any]]:
    return [f.to_json() for f in fields]


def field_layout_from_json(data: list[Mapping[str, Any]]) -> tuple[Field, ...]:
    return tuple(Field.from_json(d) for d in data)


def check_rows(fields: tuple[Field, ...], rows: Mapping[str, np.ndarray], where: str) -> int:
    """Validate names, shapes and dtypes of the arrays for one shard; return the row count."""
    expected = {f.name for f in fields}
    missing = sorted(expected - set(rows))
    extra = sorted(set(rows) - expected)
    if missing:
        raise ShardDataError(f"{where}: missing field(s) {missing}")
    if extra:
        raise ShardDataError(f"{where}: field(s) {extra} are not in the store's spec (fields: {sorted(expected)})")
    n_rows = len(rows["sample_id"])
    for f in fields:
        arr = np.asarray(rows[f.name])
        shape = (n_rows, *f.shape)
        ragged_ok = f.container == RAGGED and arr.shape[:-1] == shape[:-1] and arr.shape[-1] <= shape[-1]
        if arr.shape != shape and not ragged_ok:
            raise ShardDataError(f"{where}: field {f.name!r} has shape {arr.shape}, expected {shape}")
        ok = {
            "int": np.issubdtype(arr.dtype, np.integer),
            "float": np.issubdtype(arr.dtype, np.floating),
            "bool": arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer),
            "str": arr.dtype.kind in "OU" and all(isinstance(x, str) for x in arr.reshape(-1)),
        }[f.kind]
        if not ok:
            raise ShardDataError(f"{where}: field {f.name!r} has dtype {arr.dtype}, expected {f.kind}")
    for group in dict.fromkeys(f.group for f in fields if f.container == RAGGED):  # one ragged index per group
        ragged = [f.name for f in fields if f.container == RAGGED and f.group == group]
        if len({np.shape(rows[name]) for name in ragged}) > 1:
            shapes = {name: np.shape(rows[name]) for name in ragged}
            raise ShardDataError(f"{where}: fields {ragged} must have the same shape, got {shapes}")
    if "loss_mask" in expected and (np.asarray(rows["loss_mask"], bool) & ~np.asarray(rows["valid"], bool)).any():
        raise ShardDataError(f"{where}: field 'loss_mask' marks padding (positions where valid is False)")
    sample_ids = np.asarray(rows["sample_id"])
    if n_rows == 0:
        raise ShardDataError(f"{where}: a shard needs at least one row")
    if sample_ids.min() < 0 or len(np.unique(sample_ids)) != n_rows:
        raise ShardDataError(f"{where}: sample_id must be non-negative and unique within a shard")
    return n_rows
