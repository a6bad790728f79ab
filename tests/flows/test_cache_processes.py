"""Several worker processes on one machine (`runner.kind: processes`), on CPU: every shard is
committed once, by two processes; a re-run resumes. Out of memory in the pass (a real allocation
failure under an address-space limit) is one line naming the batch size, keeps what was committed,
and a re-run with a smaller batch finishes the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdstore.verify import verify_store

REPO = Path(__file__).resolve().parents[2]


def _config(store, teacher_dir, batch_size=2, **over):
    data = {"store": str(store), "teacher": {"name": str(teacher_dir), "batch_size": batch_size},
            "corpus": {"kind": "builtin", "max_documents": 3}, "row_length": 32, "shard_rows": 4, "split": "train",
            "signals": {"topk": {"k": 8}}}
    data.update(over)
    return data


@pytest.mark.slow
def test_two_processes_commit_every_shard_once_and_a_rerun_resumes(tmp_path, tiny_teacher_dir):
    from flows.cache_teacher import cache_teacher

    config = _config(tmp_path / "store", tiny_teacher_dir, runner={"kind": "processes", "workers": 2})
    first = cache_teacher(config)
    workers = first["shards_by_worker"]
    assert len(workers) == 2 and all(n >= 1 for n in workers.values())  # both processes computed shards
    # one commit per shard: the workers' writes add up to the shards, and every one is there
    assert sum(workers.values()) == first["shards_computed"] == first["shards"] >= 4
    report = verify_store(config["store"])
    assert report.ok and report.shards_checked == first["shards"]
    again = cache_teacher(config)
    assert again["shards_computed"] == 0 and again["shards"] == first["shards"] and again["shards_by_worker"] == {}


CHILD = textwrap.dedent("""
    import json, resource, sys
    from pipeline.capture.teacher_pass import cache_pipelined, prepare_pass
    from pipeline.config import CacheConfig, parse_config
    config = parse_config(json.loads(sys.argv[1]), CacheConfig)
    p = prepare_pass(config, progress=None)
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))  # 256 MB more, no further
    cache_pipelined(p.teacher, p.writer, p.todo, config)
""")


@pytest.mark.slow
def test_out_of_memory_names_the_batch_size_keeps_commits_and_resumes(tmp_path, tiny_teacher_dir):
    from pipeline.capture.teacher_pass import run_cache
    from pipeline.config import CacheConfig, parse_config

    store = tmp_path / "store"
    shape = {"row_length": 64, "shard_rows": 16, "corpus": {"kind": "builtin", "max_documents": 4}}
    small = _config(store, tiny_teacher_dir, max_tokens=1024, **shape)  # the first shard, committed
    assert run_cache(parse_config(small, CacheConfig), progress=None)["shards_computed"] == 1
    # a batch of 16 rows × 64 tokens: its logits are 1,024 × 49,152 × 4 B = 200 MB, and a temporary as big
    big = _config(store, tiny_teacher_dir, batch_size=16, **shape)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(big)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "DeviceError" in last and "ran out of memory on cpu at teacher.batch_size 16" in last, done.stderr[-2000:]
    assert "set teacher.batch_size to 8 or less" in last and "a re-run resumes" in last
    report = verify_store(str(store))
    assert report.ok and report.shards_checked == 1  # what was committed is kept, nothing half-written
    resumed = run_cache(parse_config(_config(store, tiny_teacher_dir, **shape), CacheConfig), progress=None)
    assert resumed["shards_skipped"] == 1 and resumed["shards_computed"] == resumed["shards"] - 1 >= 1
