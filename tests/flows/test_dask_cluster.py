"""The cache-teacher flow on a real Dask cluster: a `dask scheduler` and two `dask worker`
processes on 127.0.0.1 (started here, killed at the end), the flow submitting to the scheduler's
address. One worker is SIGKILLed while it writes a shard; the scheduler hands that shard to the
other worker, and the store ends up with every planned shard committed exactly once, byte for
byte what a straight local run writes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from kdstore.reader import StoreReader
from kdstore.verify import verify_store

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers without nannies (a killed worker stays dead),
    reporting to this session's Prefect server (the temporary one the other flow tests use, on
    127.0.0.1: already up when they ran first); yields the scheduler address and the workers."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()  # the one a flow without PREFECT_API_URL starts (and keeps)
    own = server.server_process is None  # none yet: start one of ours while the workers import
    if own:
        server = SubprocessASGIServer(_free_port())
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PREFECT_API_URL": server.api_url}
    dask = [str(Path(sys.executable).parent / "dask")]
    procs = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(dask + args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
        return proc

    start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], "scheduler")
    preload = str(Path(__file__).with_name("dask_preload.py"))
    workers = [start(["worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                      "--name", f"w{i}", "--local-directory", str(tmp_path / f"dask{i}"), "--preload", preload],
                     f"worker{i}") for i in range(2)]
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield address, workers  # the flow's tasks wait at the scheduler while the workers import
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
        if own:
            server.stop()


def _config(store: Path, teacher: Path, **over) -> dict:
    data = {
        "store": str(store), "teacher": {"name": str(teacher), "batch_size": 4},
        "corpus": {"kind": "builtin", "max_documents": 1},
        "row_length": 64, "shard_rows": 2, "split": "train",
        "signals": {"topk": {"k": 8}, "hidden": {"layers": [1, 2]}},
    }
    data.update(over)
    return data


def _commits(url: str) -> dict[str, dict]:
    reader = StoreReader(url)
    return {sid: {k: (v.bytes, v.digest) for k, v in reader.record(sid).files.items()} for sid in reader.shard_ids()}


def _task_run_states() -> list[str]:
    """States of the cache-shard task runs of the latest cache-teacher flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["cache-teacher"]}),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    return [r.state.type.value for r in runs if r.name.startswith("cache-shard")]


def _kill_first_writer(shards: Path, pids: set[int], stop: threading.Event, killed: list) -> None:
    """SIGKILL the first worker seen staging a shard (`shards/.tmp-<shard>@<host>@<pid>@...`)."""
    while not stop.is_set():
        for entry in os.scandir(shards) if shards.is_dir() else ():
            parts = entry.name.split("@")
            if entry.name.startswith(".tmp-") and len(parts) == 4 and int(parts[2]) in pids:
                os.kill(int(parts[2]), signal.SIGKILL)
                killed.append((int(parts[2]), parts[0][len(".tmp-"):], Path(entry.path)))
                return
        time.sleep(0.001)


@pytest.mark.slow
def test_flow_on_a_dask_cluster_survives_a_killed_worker(dask_cluster, tmp_path, tiny_teacher_dir):
    from flows.cache_teacher import cache_teacher

    address, workers = dask_cluster
    store = tmp_path / "store"
    config = _config(store, tiny_teacher_dir, runner={"kind": "dask", "dask_address": address})
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_writer,
                               args=(store / "shards", {w.pid for w in workers}, stop, killed), daemon=True)
    watcher.start()
    try:
        summary = cache_teacher(config)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was caught writing a shard"
    pid, shard, stage = killed[0]
    assert [w.poll() is not None for w in workers].count(True) == 1  # one worker died, the other lived on
    assert stage.exists()  # killed before its shard was published: the other worker redid it
    report = verify_store(str(store))
    assert report.ok and str(Path("shards") / stage.name) in report.leftovers
    planned = summary["shards"]
    assert summary["shards_computed"] == planned > 2 and shard in StoreReader(str(store)).shard_ids()
    assert not list((store / "shards").glob(".corrupt-*"))  # nothing was committed twice over another commit
    assert sorted(_task_run_states()) == ["COMPLETED"] * planned  # the workers reported to the flow's server

    straight = tmp_path / "straight.yaml"
    straight.write_text(yaml.safe_dump(_config(tmp_path / "straight", tiny_teacher_dir)))
    assert main(["cache", str(straight), "--no-flow"]) == 0
    assert _commits(str(store)) == _commits(str(tmp_path / "straight"))  # every shard once, the same bytes
    reader = StoreReader(str(store))
    ids = [int(i) for sid in reader.shard_ids() for i in reader.read_shard(sid, ["sample_id"])["sample_id"]]
    assert len(ids) == len(set(ids))


def test_a_scheduler_address_needs_a_prefect_server(tmp_path, tiny_teacher_dir):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cache_teacher import cache_teacher
    from pipeline.config import ConfigError

    config = _config(tmp_path / "store", tiny_teacher_dir, runner={"kind": "dask", "dask_address": "tcp://127.0.0.1:1"})
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError, match="PREFECT_API_URL"):
        cache_teacher(config)
    assert not (tmp_path / "store").exists()
