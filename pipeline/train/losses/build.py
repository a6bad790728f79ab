"""Configs → one loss module, and the store-field checks the trainer runs before any step.

`build_loss(config, store, student)` parses the configs (`registry.parse_loss_config`), checks that
the store holds every field the losses read (`check_fields`: the error names the loss and the
missing field), and builds one `KDLoss` (a list, or a weight ≠ 1, becomes a `WeightedSum`).
`store` is a `StoreInfo` or anything it is made from (a `StoreReader`, a `StoreMeta`, a
`StoreSpec`); `student` is a `StudentDims`, needed by hidden, attention and dual-space losses (layer
maps and projection widths are fixed at build time, so the projections exist before the optimizer
is made).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.train.losses.base import KDLoss, LossConfigError, MissingLossFieldError, StudentDims
from pipeline.train.losses.mix import WeightedSum
from pipeline.train.losses.registry import (
    LOSSES,
    build_one,
    config_fields,
    leaf_configs,
    parse_loss_config,
)
from pipeline.train.losses.store_info import StoreInfo


def build_loss(spec: Any, store: Any, student: StudentDims | None = None) -> KDLoss:
    """Configs (a model, a mapping, or a list of them = a weighted sum) → one loss module.

    Raises `UnknownLossError` / `LossConfigError` for bad configs and `MissingLossFieldError`
    (naming the loss and the field) when the store lacks a field a loss reads.
    """
    info = StoreInfo.of(store)
    cfg = parse_loss_config(spec)
    check_fields(cfg, info.field_names)
    if isinstance(cfg, list):
        loss: KDLoss = WeightedSum([(c.weight, build_one(c, info, student)) for c in cfg])
    else:
        loss = build_one(cfg, info, student)
        if cfg.weight != 1.0:
            loss = WeightedSum([(cfg.weight, loss)], label=cfg.name)
    check_fields(loss, info.field_names)
    return loss


def _leaves(item: Any, names: Sequence[str]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(label, store fields) of every leaf of configs or built modules."""
    if isinstance(item, WeightedSum):
        for child in item.losses:
            yield from _leaves(child, names)
    elif isinstance(item, KDLoss):
        yield item.label, tuple(item.fields)
    elif isinstance(item, list | tuple):
        for child in item:
            yield from _leaves(child, names)
    else:
        yield from config_fields(parse_loss_config(item), names)


def loss_names(losses: Any) -> set[str]:
    """The registry names of every leaf loss config (inside lists, mixes and fakd composites)."""
    return {leaf.name for leaf in leaf_configs(parse_loss_config(losses))}


def check_cross_tokenizer(losses: Any, own_tokenizer: bool) -> bool:
    """Whether batches must be re-tokenised for the student (it has its own tokenizer, or a loss
    aligns vocabularies); refuses losses that read the teacher's signals at teacher positions there
    (`LossSpec.tokens`): only cross-tokenizer losses and 'ce' may train such a student."""
    names = loss_names(losses)
    cross = sorted(n for n in names if LOSSES[n].tokens == "student")
    others = sorted(n for n in names if LOSSES[n].tokens == "teacher")
    if (cross or own_tokenizer) and others:
        why = f"next to cross-tokenizer losses {cross}" if cross else "for a student with its own tokenizer (student.tokenizer)"
        student = " or ".join(sorted(n for n, s in LOSSES.items() if s.tokens == "student"))
        either = ", ".join(repr(n) for n, s in sorted(LOSSES.items()) if s.tokens == "any")
        raise LossConfigError(f"loss(es) {others} read the teacher's signals at the teacher's token positions; {why} "
                              f"use {student}, and {either}")
    return bool(cross) or own_tokenizer


def required_fields(losses: Any, store_field_names: Sequence[str]) -> tuple[str, ...]:
    """Every store field the losses (configs or built modules) read, in order, once."""
    return tuple(dict.fromkeys(f for _, fields in _leaves(losses, store_field_names) for f in fields))


def check_fields(losses: Any, store_field_names: Sequence[str]) -> None:
    """Raise `MissingLossFieldError` naming each loss and the store field(s) it lacks."""
    names = set(store_field_names)
    problems = [
        f"loss {label!r} needs store field(s) {missing}"
        for label, fields in _leaves(losses, list(store_field_names))
        if (missing := [f for f in fields if f not in names])
    ]
    if problems:
        raise MissingLossFieldError(f"{'; '.join(problems)}; the store holds {sorted(names)}")
