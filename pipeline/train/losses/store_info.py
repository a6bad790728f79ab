"""What the losses may know of a store: its spec, field names and teacher tensors, loaded lazily.

Kept apart from the registry so the builders and the trainer share one view of a store (or of
several joined stores) without reading teacher tensors nobody asked for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdstore.fields import fields_for_spec
from kdstore.join import joined_field_names
from kdstore.spec import StoreSpec
from pipeline.train.losses.base import LossConfigError


@dataclass(frozen=True)
class StoreInfo:
    """What the losses need to know about a store: its spec, its field names, and (for dual-space
    KD) the teacher's output head and layer count, loaded only when asked for. Joined stores
    (multi-teacher, `StoreInfo.joined`): field names include teacher i's as `t<i>/<field>`, and
    `teacher_specs` holds the specs of teachers 1.. (their capture temperatures)."""

    spec: StoreSpec
    field_names: tuple[str, ...]
    head_loader: Callable[[], Tensor] | None = None
    teacher_num_layers: int | None = None
    teacher_specs: tuple[StoreSpec, ...] = ()
    embeddings_loader: Callable[[], Tensor] | None = None  # cross-tokenizer: the teacher's input embeddings
    tokenizer_loader: Callable[[], Any] | None = None  # cross-tokenizer: the store's (teacher's) tokenizer
    # normalised hidden alignment: {layer: (mean [d], std [d])} of the stored teacher hidden states
    hidden_stats_loader: Callable[[], dict[int, tuple[Tensor, Tensor]]] | None = None

    @classmethod
    def joined(cls, readers: Sequence[Any]) -> StoreInfo:
        """Teacher 0's StoreInfo, seeing the fields of every joined store (readers[0] first)."""
        info = cls.of(readers[0])
        return dataclasses.replace(info, field_names=tuple(joined_field_names(readers)),
                                   teacher_specs=tuple(r.spec for r in readers[1:]))

    def spec_of(self, teacher: int) -> StoreSpec:
        """Teacher `teacher`'s spec; without `teacher_specs`, teacher 0's stands in."""
        return self.spec if teacher == 0 or teacher > len(self.teacher_specs) else self.teacher_specs[teacher - 1]

    @classmethod
    def of(cls, store: Any) -> StoreInfo:
        if isinstance(store, StoreInfo):
            return store
        if isinstance(store, StoreSpec):
            return cls(store, tuple(f.name for f in fields_for_spec(store)))
        if hasattr(store, "read_teacher_tensors"):  # a StoreReader
            return cls(store.spec, tuple(store.field_names), lambda: _head(store), _teacher_layers(store),
                       embeddings_loader=lambda: _embeddings(store), tokenizer_loader=lambda: _tokenizer(store),
                       hidden_stats_loader=lambda: hidden_stats(store))
        if hasattr(store, "spec") and hasattr(store, "fields"):  # a StoreMeta
            return cls(store.spec, tuple(f.name for f in store.fields))
        raise TypeError(f"expected a StoreInfo, StoreReader, StoreMeta or StoreSpec, got {type(store).__name__}")

    def teacher_head(self, label: str) -> Tensor:
        return self._load(self.head_loader, "output head (teacher/output_head.safetensors)", "head_loader", label)

    def teacher_embeddings(self, label: str) -> Tensor:
        return self._load(self.embeddings_loader, "input embeddings", "embeddings_loader", label)

    def teacher_hidden_stats(self, label: str) -> dict[int, tuple[Tensor, Tensor]]:
        return self._load(self.hidden_stats_loader, "hidden-state statistics (teacher/hidden_stats.safetensors)",
                          "hidden_stats_loader", label)

    def teacher_tokenizer(self, label: str) -> Any:
        return self._load(self.tokenizer_loader, "tokenizer (teacher/tokenizer/)", "tokenizer_loader", label)

    @staticmethod
    def _load(loader: Callable[[], Any] | None, what: str, key: str, label: str) -> Any:
        if loader is None:
            raise LossConfigError(f"loss {label!r} needs the teacher's {what}; build it from a StoreReader or a StoreInfo with {key}")
        return loader()


def _head(reader: Any) -> Tensor:
    return torch.from_numpy(reader.read_teacher_tensors("output_head")["weight"]).float()


def _embeddings(reader: Any) -> Tensor:
    """Input embeddings: stored apart only when untied from the head."""
    tied = not reader.location.exists("teacher", "input_embeddings.safetensors")
    return _head(reader) if tied else torch.from_numpy(reader.read_teacher_tensors("input_embeddings")["weight"]).float()


STATS_ROWS = 16  # rows of the first shard that stand in when a store has no teacher/hidden_stats


def hidden_stats(reader: Any) -> dict[int, tuple[Tensor, Tensor]]:
    """Per stored hidden layer: the teacher pass's (mean, std) per dimension; for a store written
    without them (older stores, bench stores), the same statistics of its first shard's rows."""
    try:
        raw = reader.read_teacher_tensors("hidden_stats")
    except (FileNotFoundError, KeyError, OSError, ValueError, LookupError):
        raw = None
    layers = reader.spec.hidden.layers if reader.spec.hidden is not None else ()
    if raw is not None and all(f"std_{layer}" in raw for layer in layers):
        return {int(L): (torch.from_numpy(raw[f"mean_{L}"]).float(), torch.from_numpy(raw[f"std_{L}"]).float()) for L in layers}
    shards = reader.shard_ids()
    if not shards:
        raise LossConfigError(f"store {reader.location.url!r} has no hidden statistics and no shard to compute them from")
    names = [f"hidden_{L}" for L in layers]
    rows = reader.read_shard(shards[0], [*names, "valid"])
    valid = rows["valid"][:STATS_ROWS].astype(bool)
    out = {}
    for layer, name in zip(layers, names, strict=True):
        h = torch.from_numpy(rows[name][:STATS_ROWS][valid]).double()
        out[int(layer)] = (h.mean(0).float(), h.std(0, correction=0).float())
    return out


def _tokenizer(reader: Any) -> Any:
    from pipeline.capture.teacher_files import store_tokenizer

    return store_tokenizer(reader)


def _teacher_layers(reader: Any) -> int | None:
    try:
        info = json.loads(reader.location.read_bytes("teacher", "teacher.json"))
    except (FileNotFoundError, OSError, ValueError, AttributeError):
        return None
    layers = info.get("num_layers")
    return int(layers) if layers is not None else None
