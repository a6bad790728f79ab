"""What a store holds (spec) and where it came from (provenance), and their fingerprint.

The spec and provenance are written once into `store.json`; the fingerprint (a hash of both)
is stamped on every shard, so a store can never mix rows of two teachers, tokenizers, corpora
or specs. Frozen dataclasses with strict (de)serialisation: an unknown key is an error naming
the key, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdstore.errors import SpecError

FORMAT_VERSION = 2  # 2: byte-plane log-prob codes, delta-coded draw ids (kdstore.fields)

SAMPLERS = ("topk", "topp_k")
# how n draws per token are taken: independent (multinomial), or n evenly spaced points through
# the CDF from one uniform offset (systematic: every count is floor or ceil of n·p, still unbiased)
DRAW_SCHEMES = ("multinomial", "systematic")
HIDDEN_DTYPES = ("float16", "bfloat16", "int8")
ATTENTION_DTYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class TopKSpec:
    """Top-k (or top-p capped at k) teacher log-probs, normalised over the full vocabulary.

    `logp_step` is the quantisation step of the stored log-probs in nats (0 stores float32).
    The tail mass 1 - sum(kept probabilities) is always stored as float32.
    """

    k: int
    sampler: str = "topk"
    top_p: float | None = None
    temperature: float = 1.0
    logp_step: float = 1.0 / 16

    def __post_init__(self) -> None:
        _numbers(self, "topk", ints=("k",), floats=("top_p", "temperature", "logp_step"))
        _require(self.k >= 1, f"topk.k must be >= 1, got {self.k}")
        _require(self.sampler in SAMPLERS, f"topk.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "topp_k":
            _require(self.top_p is not None and 0 < self.top_p <= 1, "topk.top_p in (0, 1] is required for sampler 'topp_k'")
        _require(self.temperature > 0, "topk.temperature must be > 0")
        _require(0 <= self.logp_step <= 1, f"topk.logp_step must be in [0, 1] nats, got {self.logp_step}")


@dataclass(frozen=True)
class SampledSpec:
    """Random-sampling KD (arXiv 2503.16870): `n_draws` draws per token, unique ids + counts,
    taken by `scheme` (DRAW_SCHEMES)."""

    n_draws: int
    temperature: float = 1.0
    seed: int = 0
    scheme: str = "multinomial"

    def __post_init__(self) -> None:
        _numbers(self, "sampled", ints=("n_draws", "seed"), floats=("temperature",))
        _require(1 <= self.n_draws <= 255, f"sampled.n_draws must be in [1, 255], got {self.n_draws}")
        _require(self.temperature > 0, "sampled.temperature must be > 0")
        _require(self.scheme in DRAW_SCHEMES, f"sampled.scheme must be one of {DRAW_SCHEMES}, got {self.scheme!r}")


@dataclass(frozen=True)
class TailSampleSpec:
    """The hybrid sparsifier's tail (`topk_tail_sample`): beside the exact top-k head, `n_draws`
    draws per token from the teacher's tail, i.e. its distribution (at the top-k capture
    temperature) renormalised over the ids the head does not keep; unique ids + counts. Store more
    draws than a step uses and the loss can take a different subset each epoch."""

    n_draws: int
    seed: int = 0
    scheme: str = "multinomial"

    def __post_init__(self) -> None:
        _numbers(self, "tail_sample", ints=("n_draws", "seed"))
        _require(1 <= self.n_draws <= 255, f"tail_sample.n_draws must be in [1, 255], got {self.n_draws}")
        _require(self.scheme in DRAW_SCHEMES,
                 f"tail_sample.scheme must be one of {DRAW_SCHEMES}, got {self.scheme!r}")


@dataclass(frozen=True)
class HiddenSpec:
    """Hidden states [rows, T, width] of the selected layers (0 = embeddings output)."""

    layers: tuple[int, ...]
    width: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        _numbers(self, "hidden", ints=("width",), int_tuples=("layers",))
        _require(len(self.layers) > 0, "hidden.layers must name at least one layer")
        _require(len(set(self.layers)) == len(self.layers), f"hidden.layers has duplicates: {self.layers}")
        _require(self.width >= 1, "hidden.width must be >= 1")
        _require(self.dtype in HIDDEN_DTYPES, f"hidden.dtype must be one of {HIDDEN_DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class AttentionSpec:
    """Attention probabilities [rows, heads, T, T] of selected layers and heads, quantised.

    With `topk`, only the `topk` largest keys of each query row are kept (ids + values).
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    dtype: str = "uint8"
    topk: int | None = None

    def __post_init__(self) -> None:
        _numbers(self, "attention", ints=("topk",), int_tuples=("layers", "heads"))
        _require(len(self.layers) > 0 and len(self.heads) > 0, "attention needs at least one layer and one head")
        _require(len(set(self.layers)) == len(self.layers), f"attention.layers has duplicates: {self.layers}")
        _require(self.dtype in ATTENTION_DTYPES, f"attention.dtype must be one of {ATTENTION_DTYPES}, got {self.dtype!r}")
        _require(self.topk is None or self.topk >= 1, "attention.topk must be >= 1")


@dataclass(frozen=True)
class StoreSpec:
    """Which signals a store holds and how they are laid out."""

    vocab_size: int
    row_length: int
    shard_rows: int
    topk: TopKSpec | None = None
    sampled: SampledSpec | None = None
    hidden: HiddenSpec | None = None
    attention: AttentionSpec | None = None
    zstd_level: int = 1  # level 3 saves <0.3 % at k=64 and writes ~35 % slower (bench/store.py)
    record_batch_rows: int = 32
    # the text of each row and the character end of every token in it: what a student with
    # another tokenizer needs to re-tokenise the same span (cross-tokenizer distillation)
    text: bool = False
    # a per-token mask of the tokens a student is trained on (chat corpora: the assistant's turns)
    loss_mask: bool = False
    # the hybrid sparsifier: tail draws beside the top-k head (needs topk)
    tail_sample: TailSampleSpec | None = None

    def __post_init__(self) -> None:
        _numbers(self, "spec", ints=("vocab_size", "row_length", "shard_rows", "zstd_level", "record_batch_rows"))
        _require(self.vocab_size >= 2, "vocab_size must be >= 2")
        _require(self.row_length >= 1, "row_length must be >= 1")
        _require(self.shard_rows >= 1, "shard_rows must be >= 1")
        _require(1 <= self.zstd_level <= 22, "zstd_level must be in [1, 22]")
        _require(self.record_batch_rows >= 1, "record_batch_rows must be >= 1")
        if self.attention is not None and self.attention.topk is not None:
            _require(self.attention.topk <= self.row_length, "attention.topk must be <= row_length")
        _require(isinstance(self.text, bool), f"spec.text must be true or false, got {self.text!r}")
        _require(isinstance(self.loss_mask, bool), f"spec.loss_mask must be true or false, got {self.loss_mask!r}")
        _require(self.tail_sample is None or self.topk is not None, "spec.tail_sample needs topk (the head its draws exclude)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.text:  # added after format 1's first stores: absent = False keeps their fingerprints
            del data["text"]
        if not self.loss_mask:  # likewise
            del data["loss_mask"]
        if self.tail_sample is None:  # added later still: absent = None keeps older fingerprints
            del data["tail_sample"]
        for key in ("sampled", "tail_sample"):  # likewise the draw scheme: absent = multinomial
            if data.get(key) is not None and data[key]["scheme"] == "multinomial":
                del data[key]["scheme"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> StoreSpec:
        sub = {"topk": TopKSpec, "sampled": SampledSpec, "hidden": HiddenSpec, "attention": AttentionSpec,
               "tail_sample": TailSampleSpec}
        kwargs = _checked_kwargs(cls, data, where)
        for key, sub_cls in sub.items():
            if kwargs.get(key) is not None:
                sub_kwargs = _checked_kwargs(sub_cls, kwargs[key], f"{where}.{key}")
                try:
                    kwargs[key] = sub_cls(**sub_kwargs)
                except TypeError as exc:  # a missing required key
                    raise SpecError(f"{where}.{key}: {exc}") from exc
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class Provenance:
    """Where the signals came from. Plain JSON mappings so any teacher or corpus fits.

    teacher: name, revision, weights_sha256, tokenizer_sha256 ...
    corpus: the corpus *source* (what it is, not the content digest of a growing file set:
            per-file digests live in the shards' commit records).
    packing: row length, EOS handling, split ...
    """

    teacher: Mapping[str, Any] = field(default_factory=dict)
    corpus: Mapping[str, Any] = field(default_factory=dict)
    packing: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher), "corpus": dict(self.corpus), "packing": dict(self.packing)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "provenance") -> Provenance:
        return cls(**_checked_kwargs(cls, data, where))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(spec: StoreSpec, provenance: Provenance) -> str:
    """sha256 over the canonical JSON of spec + provenance (first 32 hex digits)."""
    payload = canonical_json({"spec": spec.to_dict(), "provenance": provenance.to_dict()})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def id_dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest unsigned integer that holds every token id (no 131,072 cap)."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


def _checked_kwargs(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return dict(data)


def _numbers(
    obj: Any, where: str, ints: tuple[str, ...] = (), floats: tuple[str, ...] = (), int_tuples: tuple[str, ...] = ()
) -> None:
    """Type-check numeric fields (None allowed) and store plain int/float, so equal specs get
    equal fingerprints (1 vs 1.0, numpy scalars) and a string or 2.5 is an error, not a shape."""

    def as_int(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SpecError(f"{where}.{name} must be an integer, got {value!r}")
        return int(value)

    for name in ints:
        if (value := getattr(obj, name)) is not None:
            object.__setattr__(obj, name, as_int(name, value))
    for name in floats:
        value = getattr(obj, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise SpecError(f"{where}.{name} must be a number, got {value!r}")
            object.__setattr__(obj, name, float(value))
    for name in int_tuples:
        value = getattr(obj, name)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise SpecError(f"{where}.{name} must be a list of integers, got {value!r}")
        object.__setattr__(obj, name, tuple(as_int(name, x) for x in value))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise SpecError(message)
