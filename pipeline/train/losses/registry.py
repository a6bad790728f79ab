"""The loss registry: each loss registers itself, next to its config, fields and module.

A loss is one file: its config model (a `LossConfig` subclass whose `name` is a `Literal` of the
registry names it serves), the store fields it reads, its `nn.Module` (a `KDLoss`) and its builder,
registered with `@register_loss`. Everything else is derived from `LOSSES`: parsing configs (a
mapping's `name` picks the model), the names an error lists, the store fields a config reads, the
reference pages of the docs. The built-in losses are the modules of this package (imported by the
package itself); a plugin is any module that calls `register_loss`, imported before its configs are
parsed (`TrainConfig.loss_modules`). See docs/guides/add-a-loss.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import describe_error
from pipeline.train.losses.base import KDLoss, LossConfigError, StudentDims, UnknownLossError
from pipeline.train.losses.store_info import StoreInfo


class LossConfig(BaseModel):
    """Base of every loss config: unknown keys are errors, `name` picks the loss, `weight` scales
    its total in a sum (its components are logged unweighted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="the loss's registry name")
    weight: float = Field(1.0, ge=0, description="multiplies the loss's total in a weighted sum")


Builder = Callable[[Any, StoreInfo, StudentDims | None], KDLoss]
FieldsOf = Callable[[Any, Sequence[str]], tuple[str, ...]]
Tokens = Literal["teacher", "student", "any"]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class LossSpec:
    """One registry name.

    name: what a config's `name` says; config: its pydantic model (every field described);
    summary: one line; reads: the store fields it reads, for people ("topk_ids, topk_logp, ...");
    build(cfg, store, student) → the module; fields(cfg, store_field_names) → the store fields a
    config reads (given what the store holds); children(cfg) → the loss configs a composite holds
    (`mix`, `fakd`), whose fields are theirs; tokens: whose token positions it trains at ("teacher":
    the store's signals at teacher positions, "student": cross-tokenizer, "any": either)."""

    name: str
    config: type[LossConfig]
    summary: str
    reads: str
    build: Builder
    fields: FieldsOf
    children: Callable[[Any], Sequence[Any]] | None = None
    tokens: Tokens = "teacher"
    module: str = ""  # where it was registered


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    config: type[LossConfig],
    summary: str,
    fields: tuple[str, ...] | FieldsOf | None = None,
    reads: str | None = None,
    children: Callable[[Any], Sequence[Any]] | None = None,
    tokens: Tokens = "teacher",
) -> Callable[[B], B]:
    """Decorate a builder `build(cfg, store: StoreInfo, student: StudentDims | None) -> KDLoss` to
    register it under `name`. `fields`: the store fields it reads, a tuple, or a function
    `(cfg, store_field_names) -> tuple` when they depend on the config or the store (then `reads`
    says them in words). A composite gives `children` (its part configs) instead: its fields are
    theirs. A misuse is a `LossConfigError` naming the loss (a plugin's mistake is the user's)."""
    if not issubclass(config, LossConfig):
        raise LossConfigError(f"loss {name!r}: config {config.__name__} must subclass LossConfig")
    annotation = config.model_fields["name"].annotation
    if name not in get_args(annotation):
        raise LossConfigError(f"loss {name!r}: {config.__name__}.name must be a Literal holding {name!r}")
    if fields is None:
        if children is None:
            raise LossConfigError(f"loss {name!r}: give the store fields it reads (or `children` for a composite)")
        fields_of: FieldsOf = lambda cfg, names: tuple(  # noqa: E731
            dict.fromkeys(f for _, leaf in config_fields(list(children(cfg)), names) for f in leaf))
        reads = reads or "what its parts read"
    elif callable(fields):
        if reads is None:
            raise LossConfigError(f"loss {name!r}: fields computed by a function need `reads` (what they are, in words)")
        fields_of = fields
    else:
        constant = tuple(fields)
        fields_of = lambda cfg, names: constant  # noqa: E731
        reads = reads or ", ".join(constant)

    def decorate(build: B) -> B:
        spec = LossSpec(name, config, summary, reads, build, fields_of, children, tokens, build.__module__)
        known = LOSSES.get(name)
        if known is not None and known.module != spec.module:
            raise LossConfigError(f"loss {name!r} is registered twice: by {known.module} and by {spec.module}")
        LOSSES[name] = spec
        return build

    return decorate


def import_loss_modules(modules: Sequence[str], where: str = "loss_modules") -> None:
    """Import the modules that register plugin losses: dotted module names (on sys.path), or paths
    of .py files (relative to the working directory). An import error names the entry."""
    for i, module in enumerate(modules):
        try:
            if module.endswith(".py"):
                _import_file(Path(module))
            else:
                importlib.import_module(module)
        except (ImportError, OSError, SyntaxError) as exc:
            raise LossConfigError(f"{where}[{i}]: cannot import loss module {module!r}: {exc}") from None


def _import_file(path: Path) -> None:
    name = "kdcache_loss_plugin_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no such file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def known_names() -> list[str]:
    return sorted(LOSSES)


def spec_of(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(f"unknown loss {name!r}; known losses: {', '.join(known_names())}") from None


# ---------------------------------------------------------------- parsing


def parse_loss_config(data: Any, where: str = "losses") -> Any:
    """A mapping → one loss config; a list → a list of them; models pass through. Errors name
    `where` (losses[1]...), the loss and the key; an unknown name lists the known ones."""
    if isinstance(data, BaseModel):
        return data
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        return [parse_loss_config(item, f"{where}[{i}]") for i, item in enumerate(data)]
    if not isinstance(data, Mapping):
        raise LossConfigError(f"{where}: expected a mapping with a 'name', got {type(data).__name__}")
    name = data.get("name")
    if name is None or not isinstance(name, str) or name not in LOSSES:
        what = "missing loss name" if name is None else f"unknown loss {name!r}"
        raise UnknownLossError(f"{where}: {what}; known losses: {', '.join(known_names())}")
    try:
        return LOSSES[name].config.model_validate(dict(data))
    except ValidationError as exc:
        nested = [e["ctx"]["error"] for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), LossConfigError)]
        kind = UnknownLossError if any(isinstance(e, UnknownLossError) for e in nested) else LossConfigError
        raise kind(f"{where}: " + "; ".join(_describe(e, name) for e in exc.errors())) from None


def _describe(error: Any, name: str) -> str:
    inner = error.get("ctx", {}).get("error")
    if isinstance(inner, LossConfigError):  # a composite's part, already described
        return f"{name}.{inner}"
    return describe_error({**error, "loc": (name, *error["loc"])})


def parse_parts(parts: Any, where: str) -> list[Any]:
    """A composite's list of loss configs (a `mix`'s `losses`), for its field validator."""
    if not isinstance(parts, Sequence) or isinstance(parts, str | bytes):
        raise ValueError(f"{where} must be a list of losses")
    return [parse_loss_config(part, f"{where}[{i}]") for i, part in enumerate(parts)]


# ---------------------------------------------------------------- walking configs


def build_one(cfg: Any, store: StoreInfo, student: StudentDims | None) -> KDLoss:
    """The module of one parsed loss config."""
    return spec_of(cfg.name).build(cfg, store, student)


def leaf_configs(cfg: Any) -> Iterator[Any]:
    """The leaf loss configs of a parsed config (a list, a composite, or a leaf), in order."""
    if isinstance(cfg, list):
        for child in cfg:
            yield from leaf_configs(child)
        return
    children = spec_of(cfg.name).children
    if children is None:
        yield cfg
    else:
        yield from leaf_configs(list(children(cfg)))


def config_fields(cfg: Any, names: Sequence[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(loss name, store fields it reads) for every leaf of a parsed config."""
    for leaf in leaf_configs(cfg):
        yield leaf.name, tuple(spec_of(leaf.name).fields(leaf, names))

