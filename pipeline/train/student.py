"""Students: from a config (random init), a pretrained folder, or a subset of the teacher's layers.

The student's tokenizer must be the store's (digest check against the store's provenance): a
student that tokenises differently would learn from misaligned targets. The one exception is a
student with its own tokenizer (`tokenizer:` a folder, or a pretrained student's own) trained by
the cross-tokenizer losses, which re-tokenise the store's rows and align them
(`pipeline.train.cross_tokenizer`); a teacher-layer student then gets new embedding rows for its
vocabulary, initialised from the teacher's embeddings of the same text.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from kdstore.reader import StoreReader
from kdstore.records import TEACHER_DIR
from pipeline.capture.teacher_files import store_tokenizer
from pipeline.config import Strict


class StudentConfig(Strict):
    init: Literal["config", "pretrained", "teacher_layers"] = "teacher_layers"
    path: str | None = None  # init=pretrained: a model folder
    teacher: str = "default"  # init=teacher_layers: the teacher to cut layers from
    layers: list[int] | None = None  # teacher layers to keep (init=teacher_layers)
    num_layers: int = Field(6, ge=1)  # when `layers` is not given: this many, evenly spaced
    overrides: dict[str, Any] = {}  # init=config: model config values (hidden_size, num_hidden_layers, ...)
    attn_implementation: str | None = None  # "eager" is forced when a loss needs attentions
    # a tokenizer folder of the student's own (init=config / teacher_layers): cross-tokenizer losses only
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _own_tokenizer(self) -> StudentConfig:
        if self.tokenizer is not None and self.init == "pretrained":
            raise ValueError("student.tokenizer applies to init config / teacher_layers; a pretrained student "
                             "uses the tokenizer saved with it")
        return self


class TokenizerMismatchError(ValueError):
    """The student's tokenizer is not the one the store was made with."""


@dataclass(frozen=True, eq=False)
class Student:
    model: Any
    tokenizer: Any
    origin: str
    foreign: bool = False  # its tokenizer is not the store's (cross-tokenizer distillation)


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total` layers, first and last included (e.g. 6 of 30)."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def is_foreign(tokenizer: Any, reader: StoreReader) -> bool:
    """Whether `tokenizer` differs from the one the store was made with (by digest)."""
    from pipeline.capture.teacher import tokenizer_digest

    expected = reader.meta.provenance.teacher.get("tokenizer_sha256")
    return expected is not None and tokenizer_digest(tokenizer) != expected


def check_tokenizer(tokenizer: Any, reader: StoreReader, origin: str) -> None:
    from pipeline.capture.teacher import tokenizer_digest

    if is_foreign(tokenizer, reader):
        raise TokenizerMismatchError(
            f"student {origin!r} has tokenizer digest {tokenizer_digest(tokenizer)}, store {reader.location.url!r} was "
            f"made with {reader.meta.provenance.teacher.get('tokenizer_sha256')}: a student must share the store's "
            "tokenizer, or be trained with a cross-tokenizer loss (xtok_align, dskd_cma) from a store with text"
        )


def build_student(cfg: StudentConfig, reader: StoreReader, needs_attentions: bool = False, device: str = "cpu",
                  cross_tokenizer: bool = False) -> Student:
    """The student; `cross_tokenizer` (the losses align vocabularies) lets its tokenizer differ."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    own = None
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_dir():
            raise FileNotFoundError(f"student.tokenizer {cfg.tokenizer!r} is not a tokenizer folder")
        own = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    attn = "eager" if needs_attentions else cfg.attn_implementation
    if cfg.init == "pretrained":
        if not cfg.path or not Path(cfg.path).exists():
            raise FileNotFoundError(f"student.path {cfg.path!r} does not exist")
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        origin = cfg.path
    elif cfg.init == "teacher_layers":
        model, tokenizer = _from_teacher_layers(cfg, attn)
        origin = f"{cfg.teacher} layers {model.config.kdcache_teacher_layers}"
        if own is not None:
            from pipeline.train.cross_tokenizer import init_foreign_embeddings

            init_foreign_embeddings(model, tokenizer, own)
            tokenizer = own
    else:
        tokenizer = own if own is not None else store_tokenizer(reader)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_bytes(reader.location.read_bytes(TEACHER_DIR, "config.json"))
            config = AutoConfig.from_pretrained(tmp)
        overrides = dict(cfg.overrides)
        if own is not None:
            overrides.setdefault("vocab_size", len(own))
            overrides.update({k: getattr(own, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")})
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"student.overrides: the model config has no key {key!r}")
            setattr(config, key, value)
        config.quantization_config = None
        if attn:
            config._attn_implementation = attn
        # random init drawn from torch's global RNG: the trainer seeds it with its `seed`
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        origin = f"random {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)"
    foreign = is_foreign(tokenizer, reader)
    if foreign and not cross_tokenizer:
        check_tokenizer(tokenizer, reader, origin)
    return Student(model.to(device), tokenizer, origin, foreign)


def _from_teacher_layers(cfg: StudentConfig, attn: str | None) -> tuple[Any, Any]:
    """DistilBERT / Minitron-style init: the teacher with only some of its decoder layers."""
    from pipeline.capture.teacher import load_teacher

    loaded = load_teacher(cfg.teacher, device="cpu", dtype="float32", attn_implementation=attn)
    model = copy.deepcopy(loaded.model)
    layers = model.model.layers
    keep = cfg.layers if cfg.layers is not None else evenly_spaced(len(layers), cfg.num_layers)
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"student.layers {bad}: the teacher has layers 0..{len(layers) - 1}")
    # A repeated index would put one module (shared weights, one layer_idx) at two depths.
    repeated = sorted({i for i in keep if list(keep).count(i) > 1})
    if not keep or repeated:
        raise ValueError(f"student.layers {list(keep)}: " + (f"layer(s) {repeated} repeated" if repeated else "empty")
                         + "; give distinct teacher layer indices")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.kdcache_teacher_layers = list(keep)
    model.config.quantization_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model, loaded.tokenizer
