"""What a teacher pass needs before its first forward: the loaded teacher, and the store spec and
provenance a cache config implies for it.

Kept apart from the pass itself so that planning (`kdcache plan`) and the students' online-KD
mode can load a teacher and size a store without the forward loop.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from kdstore.errors import StoreError
from kdstore.spec import Provenance, StoreSpec
from kdstore.writer import StoreWriter
from pipeline.capture.devices import check_device, worker_device
from pipeline.config import CacheConfig


@dataclass(frozen=True)
class Teacher:
    """The loaded teacher plus what the store needs to know about it."""

    model: Any
    tokenizer: Any
    facts: dict[str, Any]
    provenance: dict[str, Any]
    device: torch.device


@lru_cache(maxsize=2)
def get_teacher(name: str, revision: str | None, device: str, dtype: str, attention: bool, trust_remote_code: bool,
                placement: str | None = None) -> Teacher:
    """Load once per process (flow tasks on the same worker share it). `placement`: JSON of
    {device_map, max_memory} for a teacher spread over several devices (a string: cache key)."""
    from transformers.utils import logging as hf_logging

    from pipeline.capture.teacher import load_teacher, model_facts
    from pipeline.capture.teacher_source import resolve_teacher, teacher_label

    hf_logging.disable_progress_bar()
    source = resolve_teacher(name)  # a kdcache student's run folder → its model/ (self-distillation)
    spread = json.loads(placement) if placement else {}
    loaded = load_teacher(
        source,
        revision=revision,
        device=None if device == "auto" else str(check_device(device)),
        dtype=None if dtype == "auto" else dtype,
        attn_implementation="eager" if attention else None,
        trust_remote_code=trust_remote_code,
        device_map=spread.get("device_map"),
        max_memory=spread.get("max_memory"),
    )
    provenance = {
        # A local path is machine-specific: keep a folder name; the digests identify the teacher.
        "name": teacher_label(source, loaded.name),
        "revision": loaded.revision,
        "weights_sha256": loaded.digests.weights_sha256,
        "tokenizer_sha256": loaded.digests.tokenizer_sha256,
    }
    model = loaded.model
    # with a device_map the inputs go where the embeddings are
    return Teacher(model, loaded.tokenizer, model_facts(model), provenance, model.get_input_embeddings().weight.device)


def teacher_for(config: CacheConfig) -> Teacher:
    t = config.teacher
    placement = json.dumps({"device_map": t.device_map, "max_memory": t.max_memory}) if t.device_map is not None else None
    return get_teacher(t.name, t.revision, worker_device(config), t.dtype, config.signals.attention is not None,
                       t.trust_remote_code, placement)


def release_teachers() -> None:
    """Free the teachers this process loaded (the flow's set-up copy, before worker processes load
    theirs on the same devices)."""
    get_teacher.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_spec(config: CacheConfig, facts: dict[str, Any]) -> StoreSpec:
    s = config.signals
    check_layers(config, facts)
    return StoreSpec(
        vocab_size=int(facts["vocab_size"]),
        row_length=config.row_length,
        shard_rows=config.shard_rows,
        topk=s.topk.to_spec() if s.topk else None,
        sampled=s.sampled.to_spec() if s.sampled else None,
        hidden=s.hidden.to_spec(int(facts["hidden_size"])) if s.hidden else None,
        attention=s.attention.to_spec() if s.attention else None,
        zstd_level=config.zstd_level,
        text=s.text,
        loss_mask=config.corpus.kind == "chat",
        tail_sample=s.tail_sample.to_spec() if s.tail_sample else None,
    )


def check_layers(config: CacheConfig, facts: dict[str, Any]) -> None:
    """Refuse layers/heads the teacher lacks, naming the key and the teacher's sizes."""
    n_layers, n_heads = int(facts["num_layers"]), int(facts["num_heads"])
    s = config.signals
    if s.hidden:
        bad = [x for x in s.hidden.layers if not 0 <= x <= n_layers]
        if bad:
            raise StoreError(f"signals.hidden.layers {bad}: the teacher has hidden states 0..{n_layers} (0 = embeddings)")
    if s.attention:
        bad = [x for x in s.attention.layers if not 0 <= x < n_layers]
        if bad:
            raise StoreError(f"signals.attention.layers {bad}: the teacher has layers 0..{n_layers - 1}")
        bad = [h for h in s.attention.heads if not 0 <= h < n_heads]
        if bad:
            raise StoreError(f"signals.attention.heads {bad}: the teacher has heads 0..{n_heads - 1}")


def build_provenance(config: CacheConfig, teacher: Teacher) -> Provenance:
    corpus = config.corpus.model_dump(exclude={"max_documents", "chat"})
    if config.corpus.kind == "chat":  # the effective chat options (absent otherwise: older stores' fingerprints stay)
        corpus["chat"] = config.corpus.chat_options.model_dump()
    return Provenance(
        teacher=teacher.provenance,
        corpus=corpus,
        packing={"row_length": config.row_length, "eos_between_documents": config.corpus.kind != "chat",
                 **({"whole_conversations": True} if config.corpus.kind == "chat" else {}), "split": config.split,
                 "val_fraction": config.corpus.val_fraction, "max_documents": config.corpus.max_documents},
    )


def open_writer(config: CacheConfig, teacher: Teacher) -> StoreWriter:
    return StoreWriter(config.store, build_spec(config, teacher.facts), build_provenance(config, teacher))
