"""Self-distillation (born-again networks) from the cache: each student teaches the next one.

Round 0 caches the original teacher over the corpus and trains student 1 from that store.
Round r ≥ 1 caches student r as the teacher of a new store over the same corpus and packing (same
rows, same sample ids) and trains student r+1 from it, with the same initialisation, seed and
batches as student 1, so only the teacher changes from one generation to the next. Each round's
student is scored on the held-out documents (the same rows every round, because the corpus, the
packing and the tokenizer are the same) against that round's teacher.

Layout under ``out``::

    round<r>/store/           the store of round r's teacher
    round<r>/student<r+1>/    the student trained from it (model/, checkpoint.pt, train_log.jsonl)
    self_distill.json         one record per round: teacher, store, student, held-out perplexity
    self_distill.md           the same as a markdown table

Idempotent: the teacher pass skips committed shards, and the trainer resumes a finished student
from its checkpoint and takes no step, so a re-run does no teacher work and no training.
``pipeline.evaluation.self_distill_rounds`` runs the rounds as plain calls (each round is scored
there, after training); ``flows.self_distill`` runs them as Prefect sub-flows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.config import CacheConfig, Strict, parse_config
from pipeline.train.trainer import TrainConfig

PER_ROUND = "(set per round)"  # the value of the keys self-distillation fills in for each round
RESULT_JSON = "self_distill.json"
RESULT_MD = "self_distill.md"


class SelfDistillConfig(Strict):
    """`cache`: the teacher pass of every round (round 0's teacher, corpus, packing, signals);
    `train`: every student (initialisation, losses, steps, lr ...). Their `store` / `out` are
    set per round under `out`."""

    cache: CacheConfig
    train: TrainConfig
    rounds: int = Field(2, ge=1)  # students trained: round 0 from the teacher, then one per generation
    out: str
    eval_tokens: int = Field(4096, ge=2)  # held-out tokens each round's student is scored on
    eval_batch_size: int = Field(4, ge=1)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_store_per_round(cls, value: Any) -> Any:
        return _per_round(value, ("store",), "out/round<r>/store")

    @field_validator("train", mode="before")
    @classmethod
    def _train_paths_per_round(cls, value: Any) -> Any:
        value = _per_round(value, ("store", "out"), "out/round<r>/store and out/round<r>/student<r+1>")
        if isinstance(value, dict):
            for key in ("extra_stores", "online_teacher"):
                if value.get(key):
                    raise ValueError(f"`{key}` does not apply to self-distillation (one cached teacher per round)")
        return value

    @model_validator(mode="after")
    def _held_out(self) -> SelfDistillConfig:
        # Checked before any work: evaluation needs held-out documents (pipeline.evaluation.evaluate.heldout_rows).
        if self.cache.split != "train" or not self.cache.corpus.val_fraction:
            raise ValueError("cache.split must be 'train' and cache.corpus.val_fraction > 0: each round's "
                             "student is scored on the held-out (validation) documents")
        return self


def _per_round(value: Any, keys: tuple[str, ...], where: str) -> Any:
    if not isinstance(value, dict):
        return value
    for key in keys:
        if value.get(key, PER_ROUND) != PER_ROUND:
            raise ValueError(f"`{key}` is set per round ({where}); remove it")
    return {**value, **dict.fromkeys(keys, PER_ROUND)}


@dataclass(frozen=True)
class RoundPlan:
    """What round `index` runs: its teacher pass, its student, and how both are named."""

    index: int
    teacher: str  # what the store's provenance calls the teacher: round 0's name, else "student<r>"
    cache: CacheConfig
    train: TrainConfig

    @property
    def student(self) -> str:
        return Path(self.train.out).name

    @property
    def student_model(self) -> Path:
        return Path(self.train.out) / "model"


def out_dir(cfg: SelfDistillConfig) -> Path:
    return Path(cfg.out).expanduser().resolve()


def plan_round(cfg: SelfDistillConfig, index: int) -> RoundPlan:
    """Round `index`'s configs: round 0 caches `cache.teacher`, round r ≥ 1 the student of round r-1."""
    if not 0 <= index < cfg.rounds:
        raise ValueError(f"round {index}: this config has rounds 0..{cfg.rounds - 1}")
    root = out_dir(cfg) / f"round{index}"
    cache = cfg.cache.model_dump()
    cache["store"] = str(root / "store")
    label = cfg.cache.teacher.name
    if index > 0:
        previous = out_dir(cfg) / f"round{index - 1}" / f"student{index}"
        cache["teacher"] = {**cache["teacher"], "name": str(previous), "revision": None}
        label = previous.name
    train = {**cfg.train.model_dump(), "store": cache["store"], "out": str(root / f"student{index + 1}")}
    return RoundPlan(index, label, parse_config(cache, CacheConfig, f"round {index} cache config"),
                     parse_config(train, TrainConfig, f"round {index} train config"))


def release_teachers() -> None:
    """Drop the teachers the teacher pass keeps loaded: round r's teacher is not needed again, and
    its folder (a student's) must be re-read, not served from memory, if it changes."""
    from pipeline.capture.pass_setup import get_teacher

    get_teacher.cache_clear()


def finite(x: Any) -> float | None:
    """JSON has no NaN or infinity: a diverged value is recorded as null."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def round_line(record: dict[str, Any]) -> str:
    """One progress line per finished round."""
    reused = "" if record["trained_this_run"] else " (finished before: reused)"
    return (f"[round {record['round']}] {record['student']}{reused}: held-out perplexity {_num(record['ppl'], '.2f')}"
            f", its teacher {record['teacher']}: {_num(record['teacher_ppl'], '.2f')}")


def markdown_table(records: list[dict[str, Any]]) -> str:
    num = _num
    lines = ["| round | teacher | student | held-out ppl | teacher ppl | KL(teacher‖student) | top-1 agreement |",
             "|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['teacher']} | {r['student']} | {num(r['ppl'], '.2f')} | "
              f"{num(r['teacher_ppl'], '.2f')} | {num(r['kl_to_teacher'], '.4f')} | {num(r['top1_agreement'], '.3f')} |"
              for r in records]
    return "\n".join(lines)


def write_summary(cfg: SelfDistillConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """`out/self_distill.json` (records + config) and `out/self_distill.md` (the table)."""
    root = out_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records)
    tokens = records[0]["heldout_tokens"] if records else 0
    (root / RESULT_JSON).write_text(json.dumps({"rounds": records, "config": cfg.model_dump()}, indent=2))
    (root / RESULT_MD).write_text(
        f"# Self-distillation (born-again), {len(records)} round(s)\n\n"
        f"Round 0's teacher is `{cfg.cache.teacher.name}`; round r ≥ 1 is taught by the student of round r-1, "
        f"cached into its own store over the same rows. Every student starts from the same initialisation and "
        f"sees the same batches. Perplexity on {tokens:,} held-out tokens (the same rows every round).\n\n"
        f"{table}\n")
    return {"json": str(root / RESULT_JSON), "markdown": str(root / RESULT_MD), "table": table, "rounds": records}
