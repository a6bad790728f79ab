"""The cache-teacher Prefect flow (real ephemeral server), its artifact, Dask fan-out, the CLI."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from kdstore.verify import verify_store


def _config(store, teacher, **over):
    data = {
        "store": str(store),
        "teacher": {"name": str(teacher), "batch_size": 4},
        "corpus": {"kind": "builtin", "max_documents": 2},
        "row_length": 32,
        "shard_rows": 8,
        "split": "train",
        "signals": {"topk": {"k": 8}},
    }
    data.update(over)
    return data


@pytest.mark.slow
def test_flow_caches_publishes_artifact_and_skips_on_rerun(tmp_path, tiny_teacher_dir):
    from prefect.client.orchestration import get_client

    from flows.cache_teacher import cache_teacher

    config = _config(tmp_path / "store", tiny_teacher_dir)
    first = cache_teacher(config)
    assert first["shards_computed"] == first["shards"] > 1
    assert verify_store(config["store"]).ok
    with get_client(sync_client=True) as client:
        artifact = client._client.get(f"/artifacts/{first['artifact_id']}").json()
    assert artifact["key"] == "kdcache-store-summary" and first["fingerprint"] in artifact["data"]
    again = cache_teacher(config)
    assert again["shards_computed"] == 0 and again["shards"] == first["shards"]


@pytest.mark.slow
def test_flow_on_a_local_dask_cluster(tmp_path, tiny_teacher_dir):
    from flows.cache_teacher import cache_teacher

    config = _config(tmp_path / "store", tiny_teacher_dir, runner={"kind": "dask", "workers": 2})
    summary = cache_teacher(config)
    assert summary["shards_computed"] == summary["shards"] > 1
    assert verify_store(config["store"]).ok


def test_cli_verify_inspect_and_errors(tmp_path, tiny_teacher_dir, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "store", tiny_teacher_dir)))
    assert main(["plan", str(path)]) == 0
    assert "expected B/token" in capsys.readouterr().out
    assert main(["cache", str(path), "--no-flow"]) == 0
    assert main(["verify", str(tmp_path / "store")]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "store"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] >= 1 and info["bytes_per_token_per_field"]["topk_ids"] > 0
    # corrupt one file: verify names it and exits 1
    victim = next((tmp_path / "store" / "shards").glob("*/topk_logp.arrow"))
    victim.write_bytes(victim.read_bytes()[:-10])
    assert main(["verify", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out
    assert victim.parent.name in out and "topk_logp.arrow" in out
    # bad inputs: clear errors, exit 2
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: x\nteacher: {nmae: default}\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "teacher.nmae" in err and "bad.yaml" in err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
def test_served_schedule_caches_only_the_new_file(tmp_path, tiny_teacher_dir):
    """`kdcache serve --interval`: a real local Prefect server and runner; a file added later is
    cached by a scheduled run, the shards already there are left untouched."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The first file talks about cats and dogs. " * 10)
    store = tmp_path / "store"
    cfg = _config(store, tiny_teacher_dir, corpus={"kind": "files", "paths": [str(corpus)]}, split="all")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": "3"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(path), "--interval", "3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def committed() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in store.glob("shards/*/COMMIT.json") if not p.parent.name.startswith(".")}

    def wait_for(n: int) -> dict[Path, int]:
        deadline = time.time() + 480  # a busy 2-core machine can take minutes to start the server and runner
        while time.time() < deadline and proc.poll() is None:
            if len(done := committed()) >= n:
                return done
            time.sleep(1)
        raise AssertionError(f"no scheduled run cached {n} shard(s) (serve exit code {proc.poll()})")

    try:
        first = wait_for(1)
        (corpus / "b.txt").write_text("A second file arrives later, about birds and fish. " * 10)
        second = wait_for(len(first) + 1)
        for p, mtime in first.items():
            assert second[p] == mtime  # not recomputed
        assert verify_store(str(store)).ok
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
