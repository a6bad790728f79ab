"""Stores the benchmarks share: built once with `run_cache`, kept under
`$KDCACHE_BENCH_CACHE` (default `<tmp>/kdcache-bench/`) by a digest of their cache config, and
reused while `verify_store` finds them clean with the shard count recorded at build time. A store
without its marker is an interrupted pass: the teacher pass resumes it (committed shards kept)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import log


def cache_dir() -> Path:
    return Path(os.environ.get("KDCACHE_BENCH_CACHE") or Path(tempfile.gettempdir()) / "kdcache-bench")


def cached_store(prefix: str, data: dict[str, Any]) -> str:
    """The store for cache config `data` (its `store` key is filled in), built if needed."""
    from kdstore.verify import verify_store
    from pipeline.capture.teacher_pass import run_cache
    from pipeline.config import CacheConfig, parse_config

    data = {**data, "store": ""}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    store = cache_dir() / f"{prefix}-{key}"
    marker = cache_dir() / f"{prefix}-{key}.done.json"
    data["store"] = str(store)
    if marker.exists() and store.exists():
        try:
            report = verify_store(str(store))
            if report.ok and report.shards_checked == json.loads(marker.read_text())["shards"]:
                log(f"reusing store {store} ({report.shards_checked} shards, verified)")
                return str(store)
            log(f"store {store} does not verify ({len(report.problems)} problems): rebuilding")
        except Exception as exc:  # unreadable: rebuild
            log(f"store {store} unreadable ({exc}): rebuilding")
    if marker.exists() or not store.exists():  # without a marker, a store is a pass to resume
        shutil.rmtree(store, ignore_errors=True)
    marker.unlink(missing_ok=True)
    store.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = run_cache(parse_config(data, CacheConfig), progress=log)
    log(f"built store {store}: {summary['tokens']} tokens, {summary['shards']} shards in {time.perf_counter() - started:.1f} s")
    marker.write_text(json.dumps({"shards": summary["shards"], "tokens": summary["tokens"], "config": data,
                                  "wall_s": summary["wall_s"]}))
    return str(store)
