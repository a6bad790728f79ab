"""A store on a real S3 API: moto's server on 127.0.0.1 (started here), reached through s3fs.

The teacher pass writes to s3://, `kdcache verify` and the trainer read from it, and a pass
killed with SIGKILL while it uploads a shard resumes with nothing lost and nothing doubled (the
same shards, byte for byte, as a straight local run). Credentials come from the standard AWS
environment only, and appear in no output.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from kdstore.errors import CorruptShardError, StoreError, StoreWriteError
from kdstore.location import Location
from kdstore.reader import StoreReader
from kdstore.records import COMMIT_JSON
from kdstore.verify import verify_store

REPO = Path(__file__).resolve().parents[2]
SECRET = "kdcache-test-secret-7f3a9c"
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; the standard AWS variables point at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "kdcache-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _bucket(s3, name: str) -> str:
    Location.of(f"s3://{name}").fs.mkdir(name)
    return f"s3://{name}/store"


def _config(store: str, teacher: Path, **over) -> dict:
    data = {
        "store": store,
        "teacher": {"name": str(teacher), "batch_size": 2},
        "corpus": {"kind": "builtin", "max_documents": 1},
        "row_length": 32, "shard_rows": 2, "split": "train",
        "signals": {"topk": {"k": 8}, "hidden": {"layers": [2]}},
    }
    data.update(over)
    return data


def _commits(url: str) -> dict[str, dict]:
    """Shard id → the files of its commit record (size + digest of every file)."""
    reader = StoreReader(url)
    return {sid: {k: (v.bytes, v.digest) for k, v in reader.record(sid).files.items()} for sid in reader.shard_ids()}


@pytest.mark.slow
def test_pass_verify_and_train_on_s3(s3, tmp_path, tiny_teacher_dir, capsys):
    from pipeline.train.trainer import train

    url = _bucket(s3, "kd-roundtrip")
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(yaml.safe_dump(_config(url, tiny_teacher_dir)))
    assert main(["cache", str(cfg), "--no-flow"]) == 0
    assert main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and SECRET not in out
    reader = StoreReader(url)
    assert len(reader.shard_ids()) >= 2
    result = train({
        "store": url, "out": str(tmp_path / "run"),
        "student": {"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 1},
        "losses": [{"name": "fkl"}, {"name": "hidden", "weight": 0.1}], "batch_size": 2, "steps": 2,
        "device": "cpu", "tensorboard": False, "warmup_steps": 1,
    }, progress=False)
    assert result["steps"] == 2
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    all_ids = {int(i) for sid in reader.shard_ids() for i in reader.read_shard(sid, ["sample_id"])["sample_id"]}
    assert {i for e in logged for i in e["sample_ids"]} <= all_ids
    # an altered object is named by verify
    victim = f"{url}/shards/{reader.shard_ids()[0]}/topk_ids.arrow"
    fs = reader.location.fs
    fs.pipe_file(victim, fs.cat_file(victim)[:-3])
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert reader.shard_ids()[0] in out and "topk_ids.arrow" in out
    # ... and by every read of it, before it is decoded (verify on read)
    with pytest.raises(CorruptShardError, match=rf"store '{url}', shard {reader.shard_ids()[0]}, file topk_ids\.arrow"):
        StoreReader(url).read_shard(reader.shard_ids()[0], ["topk_ids"])


def test_a_failed_upload_is_one_line_and_a_rerun_resumes(s3, tmp_path):
    import importlib.util

    from kdstore.writer import StoreWriter

    spec_file = importlib.util.spec_from_file_location("kdstore_rows", REPO / "tests" / "kdstore" / "conftest.py")
    rows_module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(rows_module)
    spec = rows_module.full_spec(hidden=None, attention=None, text=False, sampled=None)
    url = _bucket(s3, "kd-upload")
    writer = StoreWriter(url, spec, rows_module.PROVENANCE)
    writer.write_shard("a", rows_module.make_rows(spec, 4, first_id=0))
    fs = writer.location.fs
    saved = {path: fs.cat_file(path) for path in fs.find("kd-upload")}
    real_put = fs.put_file

    def bucket_gone_mid_upload(*args, **kwargs):  # the server then answers NoSuchBucket
        fs.rm("kd-upload", recursive=True)
        fs.put_file = real_put
        return real_put(*args, **kwargs)

    fs.put_file = bucket_gone_mid_upload
    try:
        with pytest.raises(StoreWriteError, match=rf"store '{url}', shard b: upload failed .*re-run") as info:
            writer.write_shard("b", rows_module.make_rows(spec, 4, first_id=10))
    finally:
        fs.put_file = real_put
    assert "\n" not in str(info.value) and SECRET not in str(info.value)
    fs.mkdir("kd-upload")
    for path, data in saved.items():
        fs.pipe_file(path, data)
    writer = StoreWriter(url, spec, rows_module.PROVENANCE)
    assert writer.write_shard("a", rows_module.make_rows(spec, 4, first_id=0)).skipped
    assert not writer.write_shard("b", rows_module.make_rows(spec, 4, first_id=10)).skipped
    assert verify_store(url).ok and StoreReader(url).num_rows() == 8


def test_credentials_in_a_store_url_are_refused():
    with pytest.raises(StoreError, match=r"s3://\*\*\*@bucket/store.*standard environment") as info:
        Location.of(f"s3://someone:{SECRET}@bucket/store")
    assert SECRET not in str(info.value)


def _partial_shard(bucket) -> str | None:
    """A shard prefix with objects but no commit record, once another shard is committed (read
    straight from moto's backend, no HTTP)."""
    by_shard: dict[str, set[str]] = {}
    for key in list(bucket.keys.keys()):
        parts = key.split("/")
        if len(parts) >= 4 and parts[1] == "shards":
            by_shard.setdefault(parts[2], set()).add(parts[-1])
    if not any(COMMIT_JSON in files for files in by_shard.values()):
        return None
    return next((s for s, files in sorted(by_shard.items()) if COMMIT_JSON not in files), None)


@pytest.mark.slow
def test_pass_killed_mid_upload_resumes_with_nothing_lost_or_doubled(s3, tmp_path, tiny_teacher_dir):
    from moto.s3.models import s3_backends

    url = _bucket(s3, "kd-killed")
    cfg = tmp_path / "cache.yaml"
    cfg.write_text(yaml.safe_dump(_config(url, tiny_teacher_dir)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "pass.log"
    bucket = next(iter(s3_backends.values()))["aws"].buckets["kd-killed"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "cache", str(cfg), "--no-flow"], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    partial, deadline = None, time.time() + 60
    try:
        while partial is None and time.time() < deadline and proc.poll() is None:
            partial = _partial_shard(bucket)
            time.sleep(0.001)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert partial is not None, f"the pass was not caught mid-upload: {log.read_text()[-3000:]}"
    before = verify_store(url)
    assert partial in before.bad_shards  # files without a commit record: named, never read
    assert partial not in StoreReader(url).shard_ids()
    committed_before = _commits(url)
    assert committed_before
    import tempfile

    from kdstore.writer import LOCAL_STAGE_PREFIX

    stages = list(Path(tempfile.gettempdir()).glob(f"{LOCAL_STAGE_PREFIX}{proc.pid}@*"))
    assert stages  # the killed writer's local staging dir (object stores stage locally) ...

    assert main(["cache", str(cfg), "--no-flow"]) == 0  # resume in this process
    assert main(["verify", url]) == 0
    assert not any(p.exists() for p in stages)  # ... removed by the resumed pass
    after = _commits(url)
    for sid, files in committed_before.items():
        assert after[sid] == files  # committed shards were not recomputed or rewritten

    local = tmp_path / "local"
    run_local = tmp_path / "local.yaml"
    run_local.write_text(yaml.safe_dump(_config(str(local), tiny_teacher_dir)))
    assert main(["cache", str(run_local), "--no-flow"]) == 0
    assert after == _commits(str(local))  # every planned shard once, the same bytes as a straight run
    reader = StoreReader(url)
    ids = [int(i) for sid in reader.shard_ids() for i in reader.read_shard(sid, ["sample_id"])["sample_id"]]
    assert len(ids) == len(set(ids))
    assert SECRET not in log.read_text()
