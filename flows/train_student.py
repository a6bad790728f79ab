"""Prefect flow `train-student`: verify the store, then train (one task), publish the result.

The store (and each of `extra_stores`) is re-hashed first: a student is never trained on a store
that fails verification.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from kdstore.errors import CorruptShardError
from kdstore.verify import verify_store
from pipeline.config import parse_config
from pipeline.train.trainer import TrainConfig, train


@task(name="verify-store", cache_policy=NONE)
def verify_task(store: str) -> None:
    report = verify_store(store)
    if not report.ok:
        problems = "; ".join(str(p) for p in report.problems[:10])
        raise CorruptShardError(f"store {store!r} fails verification, refusing to train: {problems}")


@task(name="train", cache_policy=NONE)
def train_task(config: dict[str, Any]) -> dict[str, Any]:
    return train(config)


@flow(name="train-student")
def train_student_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config, TrainConfig, "train-student config")
    for store in (cfg.store, *cfg.extra_stores):  # multi-teacher: every joined store
        verify_task(store)
    result = train_task(cfg.model_dump())
    last = result.get("last", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in last.items())
    create_markdown_artifact(markdown=f"# kdcache student\n\n{result['student']} → {result['out']}\n\n| | |\n|---|---|\n{rows}\n",
                             key="kdcache-train-summary", description="kdcache train-student")
    return result
