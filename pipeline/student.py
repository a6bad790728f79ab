"""Students: from a config (random init), a pretrained folder, or a subset of the teacher's layers.

Whatever the origin, the student's tokenizer must be the store's (digest check against the
store's provenance): a student that tokenises differently would learn from misaligned targets.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from kdstore.reader import StoreReader
from kdstore.records import TEACHER_DIR
from pipeline.config import Strict


class StudentConfig(Strict):
    init: Literal["config", "pretrained", "teacher_layers"] = "teacher_layers"
    path: str | None = None  # init=pretrained: a model folder
    teacher: str = "default"  # init=teacher_layers: the teacher to cut layers from
    layers: list[int] | None = None  # teacher layers to keep (init=teacher_layers)
    num_layers: int = Field(6, ge=1)  # when `layers` is not given: this many, evenly spaced
    overrides: dict[str, Any] = {}  # init=config: model config values (hidden_size, num_hidden_layers, ...)
    attn_implementation: str | None = None  # "eager" is forced when a loss needs attentions


class TokenizerMismatchError(ValueError):
    """The student's tokenizer is not the one the store was made with."""


@dataclass(frozen=True, eq=False)
class Student:
    model: Any
    tokenizer: Any
    origin: str


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `total` layers, first and last included (e.g. 6 of 30)."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def store_tokenizer(reader: StoreReader) -> Any:
    """The tokenizer saved under the store's teacher/ folder."""
    from transformers import AutoTokenizer

    loc = reader.location
    files = loc.walk_files(TEACHER_DIR, "tokenizer") if loc.exists(TEACHER_DIR, "tokenizer") else {}
    if not files:
        raise FileNotFoundError(f"store {loc.url!r} has no {TEACHER_DIR}/tokenizer/ (written by the teacher pass)")
    with tempfile.TemporaryDirectory() as tmp:
        for rel in files:
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(loc.read_bytes(TEACHER_DIR, "tokenizer", rel))
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def check_tokenizer(tokenizer: Any, reader: StoreReader, origin: str) -> None:
    from pipeline.teacher import tokenizer_digest

    expected = reader.meta.provenance.teacher.get("tokenizer_sha256")
    actual = tokenizer_digest(tokenizer)
    if expected is not None and actual != expected:
        raise TokenizerMismatchError(
            f"student {origin!r} has tokenizer digest {actual}, store {reader.location.url!r} was made with "
            f"{expected}: a student must share the store's tokenizer (cross-vocabulary distillation is a separate method)"
        )


def build_student(cfg: StudentConfig, reader: StoreReader, needs_attentions: bool = False, device: str = "cpu") -> Student:
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = "eager" if needs_attentions else cfg.attn_implementation
    if cfg.init == "pretrained":
        if not cfg.path or not Path(cfg.path).exists():
            raise FileNotFoundError(f"student.path {cfg.path!r} does not exist")
        from transformers import AutoTokenizer

        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        origin = cfg.path
    elif cfg.init == "teacher_layers":
        model, tokenizer = _from_teacher_layers(cfg, attn)
        origin = f"{cfg.teacher} layers {model.config.kdcache_teacher_layers}"
    else:
        tokenizer = store_tokenizer(reader)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_bytes(reader.location.read_bytes(TEACHER_DIR, "config.json"))
            config = AutoConfig.from_pretrained(tmp)
        for key, value in cfg.overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"student.overrides: the model config has no key {key!r}")
            setattr(config, key, value)
        config.quantization_config = None
        if attn:
            config._attn_implementation = attn
        # random init drawn from torch's global RNG: the trainer seeds it with its `seed`
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        origin = f"random {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)"
    check_tokenizer(tokenizer, reader, origin)
    return Student(model.to(device), tokenizer, origin)


def _from_teacher_layers(cfg: StudentConfig, attn: str | None) -> tuple[Any, Any]:
    """DistilBERT / Minitron-style init: the teacher with only some of its decoder layers."""
    from pipeline.teacher import load_teacher

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
