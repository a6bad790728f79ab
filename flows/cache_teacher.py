"""Prefect flow `cache-teacher`: one task per shard, retries, committed shards never recomputed.

The thread runner (default) runs two shards at once so one shard's write overlaps the next
one's forward pass (the device itself is taken by one shard at a time); a Dask runner fans
shards out over a LocalCluster or a scheduler address (with `runner.devices`, each worker process
on a GPU of its own); the processes runner runs one task per device, each a process pinned to it
over its share of the shards (`pipeline.capture.processes`). A failed task does not stop the
others: what they commit stays, and the first error is raised once all have ended. The flow's result is the store summary,
also published as a markdown artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from kdstore.writer import out_of_space
from pipeline.capture.devices import check_runner_devices
from pipeline.capture.pass_setup import release_teachers
from pipeline.capture.processes import gather, groups, run_group
from pipeline.capture.shard_plan import ShardPlan
from pipeline.capture.teacher_pass import (
    cache_shard,
    pass_summary,
    prepare_pass,
)
from pipeline.config import CacheConfig, ConfigError, parse_config


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """No retry for what a retry cannot mend: a config or device error (out of memory at this
    batch size, a missing device), whose message says what to change, or a full disk."""
    try:
        state.result()
    except Exception as exc:
        return not (isinstance(exc, ConfigError) or out_of_space(exc.__cause__ or exc))
    return True


@task(name="cache-shard", retries=2, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=retry_unless_user_error)
def cache_shard_task(config: CacheConfig, plan: ShardPlan) -> dict[str, Any]:
    return cache_shard(config, plan)


@task(name="cache-device", retries=1, retry_delay_seconds=2, cache_policy=NONE, retry_condition_fn=retry_unless_user_error)
def cache_group_task(config: CacheConfig, device: int | None, plans: list[ShardPlan]) -> list[dict[str, Any]]:
    """One worker process (pinned to `device`) over its share of the shards."""
    return run_group(config, device, plans)


@flow(name="cache-teacher", task_runner=ThreadPoolTaskRunner(max_workers=2))
def cache_teacher_flow(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = parse_config(config, CacheConfig, "cache-teacher config")
    check_runner_devices(cfg)
    pass_plan = prepare_pass(cfg, force=force)
    plans, todo, retired = pass_plan.plans, pass_plan.todo, pass_plan.retired
    if cfg.runner.kind == "processes" or cfg.runner.devices:
        del pass_plan
        release_teachers()  # the worker processes load their own copies, on the same devices
    pass_started = time.perf_counter()  # the rate counts the pass, not the one-time set-up
    if cfg.runner.kind == "processes":
        futures = [cache_group_task.submit(cfg, device, group) for device, group in groups(cfg, todo)]
        wait(futures)
        computed = gather([f.result for f in futures])
        by_worker = Counter(r["worker"] for r in computed)
    else:
        by_worker = None
        futures = [cache_shard_task.submit(cfg, p) for p in todo]
        wait(futures)
        computed = [r for r in gather([lambda f=f: [f.result()] for f in futures]) if not r["skipped"]]
    done = time.perf_counter()
    summary = pass_summary(cfg.store, plans, computed, retired, done - started, done - pass_started)
    if by_worker is not None:
        summary["shards_by_worker"] = dict(sorted(by_worker.items()))
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
        # the workers report to this process's Prefect server (without it each would start its own)
        env = {"PREFECT_API_URL": prefect_api_url()}
        # with runner.devices, one worker per device: each claims its own (pipeline.capture.devices)
        return DaskTaskRunner(cluster_kwargs={"n_workers": r.processes, "threads_per_worker": 1, "processes": True,
                                              "env": env})
    if r.kind == "processes":  # a thread per worker process, which does the work
        return ThreadPoolTaskRunner(max_workers=r.processes)
    # At least two threads so a shard's write overlaps the next shard's forward pass.
    return ThreadPoolTaskRunner(max_workers=max(2, r.workers))


def prefect_api_url() -> str:
    """PREFECT_API_URL, else the URL of this process's temporary server (started when not yet up),
    the one Prefect itself would use for a flow here."""
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def cache_teacher(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Run the flow with the task runner the config asks for (`force`: start even when the disk
    looks too small for the plan)."""
    cfg = parse_config(config, CacheConfig, "cache-teacher config")
    check_runner_devices(cfg)
    check_cluster_api(cfg)
    flow_ = cache_teacher_flow.with_options(task_runner=task_runner_for(cfg))
    return flow_(cfg.model_dump(), force=force)


def check_cluster_api(cfg: CacheConfig) -> None:
    """Workers of a Dask cluster run the task engine themselves and report to the Prefect API: with
    no PREFECT_API_URL each would start a temporary server of its own (each its own database, none
    of them the flow's), so a scheduler address needs a real server."""
    from prefect.settings import PREFECT_API_URL

    if cfg.runner.kind == "dask" and cfg.runner.dask_address and not PREFECT_API_URL.value():
        raise ConfigError(
            f"runner.dask_address {cfg.runner.dask_address!r}: the flow and the Dask workers need one Prefect "
            "server; start one (`prefect server start`) and set PREFECT_API_URL for this process and the workers")


def serve_cache(config: dict[str, Any], cron: str | None = None, interval: float | None = None, name: str = "kdcache-cache") -> None:
    """Serve `cache-teacher` as a scheduled Prefect deployment: each run caches new corpus files only.

    Prefect's temporary server has no scheduler, so with no PREFECT_API_URL this starts a local
    Prefect server on 127.0.0.1 (SQLite under PREFECT_HOME) for as long as serving lasts.
    Blocks until interrupted. Scheduled runs use the flow's thread task runner.
    """
    if (cron is None) == (interval is None):
        raise ValueError("serve needs exactly one of cron or interval")
    cfg = parse_config(config, CacheConfig, "cache-teacher config")
    if os.environ.get("PREFECT_API_URL"):
        cache_teacher_flow.serve(name=name, cron=cron, interval=interval, parameters={"config": cfg.model_dump()},
                                 limit=1)  # one pass at a time: a run that comes due meanwhile waits
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server below is stopped too
    with local_prefect_server() as url:
        cmd = [sys.executable, "-c", "import sys, json; from flows.cache_teacher import serve_cache; "
               "serve_cache(json.loads(sys.argv[1]), cron=sys.argv[2] or None, "
               "interval=float(sys.argv[3]) if sys.argv[3] else None, name=sys.argv[4])",
               json.dumps(cfg.model_dump()), cron or "", "" if interval is None else str(interval), name]
        subprocess.run(cmd, env={**os.environ, "PREFECT_API_URL": url}, check=False)


@contextlib.contextmanager
def local_prefect_server(timeout_s: float = 180.0, port: int | None = None) -> Iterator[str]:
    """A `prefect server start` on a loopback port (free when not given), stopped on exit; yields its API URL."""
    import httpx

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": os.environ.get("PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS", "10")}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with code {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not answer on {url} within {timeout_s:.0f} s")
            time.sleep(0.5)
        print(f"local Prefect server at {url} (stops with this command)", flush=True)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
