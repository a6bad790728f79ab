"""Prefect flow `cache-teacher`: one task per shard, retries, committed shards never recomputed.

The thread runner (default) runs two shards at once so one shard's write overlaps the next
one's forward pass (the device itself is taken by one shard at a time); a Dask runner fans
shards out over a LocalCluster or a scheduler address. The flow's result is the store summary,
also published as a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import CacheConfig, parse_config
from pipeline.shard_plan import ShardPlan, plan_shards
from pipeline.teacher_pass import (
    cache_shard,
    open_writer,
    pass_summary,
    retire_stale_shards,
    teacher_for,
)


@task(name="cache-shard", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def cache_shard_task(config: CacheConfig, plan: ShardPlan) -> dict[str, Any]:
    return cache_shard(config, plan)


@flow(name="cache-teacher")
def cache_teacher_flow(config: dict[str, Any]) -> dict[str, Any]:
    import time

    started = time.perf_counter()
    cfg = parse_config(config, CacheConfig, "cache-teacher config")
    teacher = teacher_for(cfg)
    writer = open_writer(cfg, teacher)
    writer.cleanup_stale()
    plans = plan_shards(cfg, teacher.tokenizer)
    retired = retire_stale_shards(writer, plans)
    todo = [p for p in plans if writer.committed(p.shard_id) is None]
    print(f"{len(plans)} shards planned, {len(plans) - len(todo)} already committed, {len(todo)} to compute")
    futures = [cache_shard_task.submit(cfg, p) for p in todo]
    results = [f.result() for f in futures]
    computed = [r for r in results if not r["skipped"]]
    summary = pass_summary(cfg.store, plans, computed, retired, time.perf_counter() - started)
    artifact_id = create_markdown_artifact(markdown=summary_markdown(summary), key="kdcache-store-summary",
                                           description="kdcache teacher pass")
    return {**summary, "artifact_id": str(artifact_id)}


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    return f"# kdcache teacher pass\n\n| | |\n|---|---|\n{rows}\n"


def task_runner_for(cfg: CacheConfig):
    r = cfg.runner
    if r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if r.dask_address:
            return DaskTaskRunner(address=r.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": r.workers, "threads_per_worker": 1, "processes": True})
    # At least two threads so a shard's write overlaps the next shard's forward pass.
    return ThreadPoolTaskRunner(max_workers=max(2, r.workers))


def cache_teacher(config: dict[str, Any]) -> dict[str, Any]:
    """Run the flow with the task runner the config asks for."""
    cfg = parse_config(config, CacheConfig, "cache-teacher config")
    flow_ = cache_teacher_flow.with_options(task_runner=task_runner_for(cfg))
    return flow_(cfg.model_dump())
