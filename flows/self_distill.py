"""Prefect flow `self-distill`: born-again rounds as sub-flows, the work in `pipeline.train.self_distill`.

Per round: the `cache-teacher` sub-flow (round 0: the configured teacher; round r ≥ 1: the
student of round r-1), the `train-student` sub-flow (checks the store's structure, then trains or, when
the student is finished, resumes and does nothing), and one task scoring the student on held-out
rows. The rounds table is written by a task and published as a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline.config import parse_config
from pipeline.evaluation.self_distill_rounds import evaluate_round
from pipeline.train.self_distill import (
    SelfDistillConfig,
    plan_round,
    release_teachers,
    round_line,
    write_summary,
)


def _cfg(config: dict[str, Any]) -> SelfDistillConfig:
    return parse_config(config, SelfDistillConfig, "self-distill config")


@task(name="evaluate-round", cache_policy=NONE)
def evaluate_round_task(config: dict[str, Any], index: int, cached: dict[str, Any],
                        trained: dict[str, Any]) -> dict[str, Any]:
    cfg = _cfg(config)
    return evaluate_round(cfg, plan_round(cfg, index), cached, trained)


@task(name="write-self-distill-summary", cache_policy=NONE)
def write_summary_task(config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    return write_summary(_cfg(config), records)


@flow(name="self-distill")
def self_distill_flow(config: dict[str, Any]) -> dict[str, Any]:
    from flows.cache_teacher import cache_teacher
    from flows.train_student import train_student_flow

    cfg = _cfg(config)
    records = []
    for index in range(cfg.rounds):
        plan = plan_round(cfg, index)  # round r needs the student of round r-1 on disk: built in order
        print(f"[round {index}] teacher {plan.teacher} → {plan.cache.store}", flush=True)
        try:
            cached = cache_teacher(plan.cache.model_dump())
        finally:
            release_teachers()
        print(f"[round {index}] training {plan.student} → {plan.train.out}", flush=True)
        trained = train_student_flow(plan.train.model_dump())
        records.append(evaluate_round_task(cfg.model_dump(), index, cached, trained))
        print(round_line(records[-1]), flush=True)
    written = write_summary_task(cfg.model_dump(), records)
    create_markdown_artifact(markdown=f"# kdcache self-distillation\n\n{written['table']}\n\n{written['json']}\n",
                             key="kdcache-self-distill", description="kdcache self-distill rounds")
    return written
