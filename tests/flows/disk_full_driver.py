"""Run inside a private mount namespace by test_disk_space.py: a real, tiny tmpfs holds the store.

argv: mount point, config path, store path, tmpfs size while full, tmpfs size to resume with.
Prints one JSON object: each step's exit code, stderr lines, and what the store holds after it.
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

from flows.cli import main

mnt, config, store, small, big = sys.argv[1:6]


def kdcache(*args: str) -> dict:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(list(args))
    return {"rc": rc, "stderr": [line for line in err.getvalue().splitlines() if line.strip()],
            "stdout": out.getvalue()[-3000:]}


def entries() -> list[str]:
    shards = Path(store) / "shards"
    return sorted(p.name for p in shards.iterdir()) if shards.exists() else []


subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={small}", "tmpfs", mnt], check=True)
out = {"refused": kdcache("cache", config, "--no-flow")}
out["after_refusal"] = entries()
out["forced"] = kdcache("cache", config, "--no-flow", "--force")
out["after_full"] = entries()
out["verify_full"] = kdcache("verify", store)
subprocess.run(["mount", "-o", f"remount,size={big}", mnt], check=True)
out["resumed"] = kdcache("cache", config, "--no-flow")
out["verify"] = kdcache("verify", store)
out["after_resume"] = entries()
print(json.dumps(out))
