"""A full disk, a failed upload and a file given as the store: one-line user errors (exit 2),
the staged shard removed, committed shards kept, and a re-run that resumes.

The full disk is real: a tmpfs of a few MB mounted in a private mount namespace (`unshare`,
as root or through an unprivileged user namespace); where neither is allowed the test is
skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


def _config(store: Path | str, teacher: Path, **over) -> dict:
    data = {
        "store": str(store),
        "teacher": {"name": str(teacher), "batch_size": 2},
        "corpus": {"kind": "builtin", "max_documents": 40},
        "row_length": 256, "shard_rows": 8, "split": "train",
        "signals": {"topk": {"k": 8}, "hidden": {"layers": [0, 1, 2], "dtype": "float16"}},
    }
    data.update(over)
    return data


def _unshare() -> list[str] | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (["unshare", "--mount", "--propagation", "private"], ["unshare", "-r", "--mount"]):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_a_file_as_the_store_is_one_line(tmp_path, tiny_teacher_dir, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("not a store")
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump(_config(file, tiny_teacher_dir)))
    for argv in (["cache", str(config), "--no-flow"], ["verify", str(file)], ["inspect", str(file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a file, not a folder" in err and str(file) in err, err
    assert file.read_text() == "not a store"


@pytest.mark.slow
def test_full_disk_refusal_force_enospc_and_resume(tmp_path, tiny_teacher_dir):
    prefix = _unshare()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (no root, no user namespaces)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    store = mnt / "store"
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump(_config(store, tiny_teacher_dir)))
    # a disk with room for teacher/ and about half the shards: the plan is refused, --force fills it
    from pipeline.capture.shard_plan import plan_cache
    from pipeline.config import CacheConfig, parse_config

    shards = plan_cache(parse_config(_config(store, tiny_teacher_dir), CacheConfig)).est_bytes
    teacher = sum(p.stat().st_size for p in tiny_teacher_dir.iterdir() if p.suffix != ".safetensors")
    head = 2 * 49152 * 64
    assert shards > 2.5 * teacher, (shards, teacher)  # the half-full disk also holds the tokenizer files
    small = int(head + teacher + shards / 2) // 4096 * 4096
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, str(REPO / "tests/flows/disk_full_driver.py"), str(mnt),
                           str(config), str(store), str(small), str(8 * small)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    refused = out["refused"]
    assert refused["rc"] == 2 and len(refused["stderr"]) == 1, refused
    assert "needs about" in refused["stderr"][0] and "free" in refused["stderr"][0] and "--force" in refused["stderr"][0]
    assert out["after_refusal"] == []  # nothing computed
    forced = out["forced"]
    assert forced["rc"] == 2 and len(forced["stderr"]) == 1, forced
    line = forced["stderr"][0]
    assert "no space left" in line and str(store) in line and ", shard " in line and "internal error" not in line
    assert out["after_full"] and not [n for n in out["after_full"] if n.startswith(".")]  # staged shard removed
    assert out["verify_full"]["rc"] == 0, out["verify_full"]  # what was committed is intact
    assert out["resumed"]["rc"] == 0, out["resumed"]
    resumed = json.loads(out["resumed"]["stdout"][out["resumed"]["stdout"].index("{"):])
    assert resumed["shards_skipped"] == len(out["after_full"]) and resumed["shards_computed"] > 0
    assert out["verify"]["rc"] == 0, out["verify"]  # every row once, every file intact
