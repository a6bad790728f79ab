"""Prefect flow `train-student`: check the store's structure, then train (one task), publish the result.

The store (and each of `extra_stores`) gets a structural check that reads no shard payload
(store.json against its fingerprint, teacher/COMMIT.json, every shard's commit record): a run
never pays a whole-store read before its first step. The payload is checked as it is read
(verify on read), so no altered byte reaches a loss; `kdcache verify` is the full re-hash.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from kdstore.errors import CorruptShardError
from kdstore.verify import check_structure
from pipeline.config import parse_config
from pipeline.train.trainer import TrainConfig, train


@task(name="check-store", cache_policy=NONE)
def check_store_task(store: str) -> None:
    report = check_structure(store)
    if not report.ok:
        problems = "; ".join(str(p) for p in report.problems[:10])
        raise CorruptShardError(f"store {store!r} fails its structural check, refusing to train: {problems} "
                                "(`kdcache verify` names every bad file)")


@task(name="train", cache_policy=NONE)
def train_task(config: dict[str, Any]) -> dict[str, Any]:
    return train(config)


@flow(name="train-student")
def train_student_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config, TrainConfig, "train-student config")
    for store in (cfg.store, *cfg.extra_stores):  # multi-teacher: every joined store
        check_store_task(store)
    result = train_task(cfg.model_dump())
    last = result.get("last", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in last.items())
    create_markdown_artifact(markdown=f"# kdcache student\n\n{result['student']} → {result['out']}\n\n| | |\n|---|---|\n{rows}\n",
                             key="kdcache-train-summary", description="kdcache train-student")
    return result
