"""JSON-serialisable array codecs, in the style of zarr v3's codec pipeline.

A field's chain is a list of array→array codecs (applied in order on write, in reverse on read)
followed by the container's bytes→bytes compression (Arrow IPC or zarr zstd). Each codec is a
frozen dataclass whose JSON form (`to_json`) is written into `store.json` and the files'
metadata, so a reader rebuilds every chain from the store alone (`codec_from_json`).

All work is vectorised numpy over whole record batches: no per-token Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Protocol

import numpy as np

from kdstore.errors import ShardDataError, SpecError


class Codec(Protocol):
    name: ClassVar[str]

    def encode(self, array: np.ndarray) -> np.ndarray: ...

    def decode(self, array: np.ndarray) -> np.ndarray: ...

    def to_json(self) -> dict[str, Any]: ...


def _to_json(codec: Any) -> dict[str, Any]:
    return {"name": codec.name, "configuration": dataclasses.asdict(codec)}


@dataclass(frozen=True)
class Cast:
    """Integer narrowing: `dtype` on disk, `decoded` in memory. Range-checked on encode."""

    name: ClassVar[str] = "cast"
    dtype: str
    decoded: str

    def encode(self, array: np.ndarray) -> np.ndarray:
        target = np.dtype(self.dtype)
        if array.dtype == target:
            return array
        if array.size and np.issubdtype(target, np.integer):
            info = np.iinfo(target)
            lo, hi = array.min(), array.max()
            if lo < info.min or hi > info.max:
                raise ShardDataError(f"values in [{lo}, {hi}] do not fit {self.dtype}")
        return array.astype(target)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return array.astype(self.decoded, copy=False)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class LogQuant:
    """Log-probabilities (≤ 0) to unsigned integers q = round(-logp / step).

    The top code (2^bits - 1) stands for -inf (padding of top-p rows). Rounding keeps the
    per-value error within step/2 nats; the KL this causes is measured by `bench/store.py`.
    """

    name: ClassVar[str] = "log_quant"
    step: float
    dtype: str = "uint16"

    def encode(self, array: np.ndarray) -> np.ndarray:
        top = np.iinfo(self.dtype).max
        q = np.multiply(array, -1.0 / self.step, dtype=np.float32)
        np.rint(q, out=q)
        # NaN also lands on the -inf code; -inf → +inf → top code.
        np.clip(q, 0, top - 1, out=q, where=np.isfinite(q))
        q[~np.isfinite(q)] = top
        return q.astype(self.dtype)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return np.take(_log_quant_table(self.step, self.dtype), array)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@lru_cache(maxsize=8)
def _log_quant_table(step: float, dtype: str) -> np.ndarray:
    top = np.iinfo(dtype).max
    table = np.arange(top + 1, dtype=np.float64) * -step
    table[top] = -np.inf
    return table.astype(np.float32)


@dataclass(frozen=True)
class Delta:
    """Differences along the last axis, first element kept; modular in the integer dtype.

    Top-k log-prob codes are sorted, so their deltas are small and zstd packs them tightly.
    Modular arithmetic makes the round trip exact for any input order.
    """

    name: ClassVar[str] = "delta"

    def encode(self, array: np.ndarray) -> np.ndarray:
        out = array.copy()
        out[..., 1:] -= array[..., :-1]
        return out

    def decode(self, array: np.ndarray) -> np.ndarray:
        return np.cumsum(array, axis=-1, dtype=array.dtype)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class BytePlanes:
    """Each row's bytes regrouped by significance (all low bytes, then the next, ...): same dtype
    and shape, so the container still sees a fixed-width array.

    Delta-coded top-k log-prob codes are uint16 values < 256 almost everywhere; interleaved, every
    second byte is a zero zstd must encode, while a plane of zeros costs next to nothing (about
    3 B/token of 11 at k = 16). A row is one slice along the first axis; a 1-D array (the flat
    values of a ragged field) is one row.
    """

    name: ClassVar[str] = "byte_planes"

    def encode(self, array: np.ndarray) -> np.ndarray:
        if not array.size:
            return array
        rows = _as_rows(array)
        size = array.dtype.itemsize
        planes = rows.view(np.uint8).reshape(len(rows), -1, size).transpose(0, 2, 1)
        return np.ascontiguousarray(planes).reshape(len(rows), -1).view(array.dtype).reshape(array.shape)

    def decode(self, array: np.ndarray) -> np.ndarray:
        if not array.size:
            return array
        rows = _as_rows(array)
        size = array.dtype.itemsize
        planes = rows.view(np.uint8).reshape(len(rows), size, -1).transpose(0, 2, 1)
        return np.ascontiguousarray(planes).reshape(len(rows), -1).view(array.dtype).reshape(array.shape)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


def _as_rows(array: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(array)
    return flat.reshape(1, -1) if flat.ndim <= 1 else flat.reshape(len(flat), -1)


@dataclass(frozen=True)
class ProbQuant:
    """Probabilities in [0, 1] to round(p * max) of an unsigned dtype (attention maps)."""

    name: ClassVar[str] = "prob_quant"
    dtype: str = "uint8"

    def encode(self, array: np.ndarray) -> np.ndarray:
        top = np.iinfo(self.dtype).max
        q = np.clip(np.rint(np.asarray(array, dtype=np.float32) * top), 0, top)
        return q.astype(self.dtype)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) * np.float32(1.0 / np.iinfo(self.dtype).max)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class BFloat16:
    """float32 to bfloat16 bit patterns (uint16), round to nearest even; NaN kept NaN."""

    name: ClassVar[str] = "bfloat16"

    def encode(self, array: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        out = ((bits + rounding) >> 16).astype(np.uint16)
        nan = np.isnan(array)
        if nan.any():
            out[nan] = 0x7FC0
        return out

    def decode(self, array: np.ndarray) -> np.ndarray:
        return (array.astype(np.uint32) << 16).view(np.float32)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class FloatCast:
    """Float narrowing (float32 → float16); decoded back to `decoded`."""

    name: ClassVar[str] = "float_cast"
    dtype: str = "float16"
    decoded: str = "float32"

    def encode(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array).astype(self.dtype)

    def decode(self, array: np.ndarray) -> np.ndarray:
        return array.astype(self.decoded, copy=False)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class Int8RowScale:
    """Symmetric int8 with one float16 scale per vector along the last axis.

    Not a one-array codec: `encode_pair` gives (q, scale) stored as two arrays; the per-value
    error is at most scale/2 = max|x|/254 of its own vector.
    """

    name: ClassVar[str] = "int8_rowscale"

    def encode_pair(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(array, dtype=np.float32)
        amax = np.abs(x).max(axis=-1, keepdims=True)
        exact = amax / np.float32(127.0)
        scale = exact.astype(np.float16)
        # Round the scale *up* in float16: a scale rounded down clips max|x| (by up to 2% where
        # float16 is subnormal) and a tiny vector's scale would underflow to 0 (all values lost).
        low = scale.astype(np.float32) < exact
        scale[low] = np.nextafter(scale[low], np.float16(np.inf))
        # Use the float16-rounded scale, so decode(q, scale) is what was measured on encode.
        safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        return q, scale[..., 0]

    def decode_pair(self, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return q.astype(np.float32) * scale.astype(np.float32)[..., None]

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class Zstd:
    """bytes→bytes compression, applied by the container (Arrow IPC buffers or zarr chunks)."""

    name: ClassVar[str] = "zstd"
    level: int = 3

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


_REGISTRY: dict[str, type] = {
    c.name: c for c in (Cast, LogQuant, Delta, BytePlanes, ProbQuant, BFloat16, FloatCast, Int8RowScale, Zstd)
}


def codec_from_json(data: Mapping[str, Any]) -> Any:
    try:
        cls = _REGISTRY[data["name"]]
    except KeyError as exc:
        raise SpecError(f"unknown codec {data!r}; known: {sorted(_REGISTRY)}") from exc
    return cls(**data.get("configuration", {}))


def chain_to_json(chain: Sequence[Any]) -> list[dict[str, Any]]:
    return [c.to_json() for c in chain]


def chain_from_json(data: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    return tuple(codec_from_json(d) for d in data)


def encode_chain(chain: Sequence[Any], array: np.ndarray) -> np.ndarray:
    for codec in chain:
        if hasattr(codec, "encode"):
            array = codec.encode(array)
    return array


def decode_chain(chain: Sequence[Any], array: np.ndarray) -> np.ndarray:
    for codec in reversed(chain):
        if hasattr(codec, "decode"):
            array = codec.decode(array)
    return array
