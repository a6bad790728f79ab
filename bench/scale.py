"""A store at scale on this machine: 10^8 tokens of synthetic sampled-12 signals at V = 151,936.

Why: the store's promises (every byte checked before a loss sees it, no whole-store pass before
training, memory bounded by the shuffle buffer) have to hold at the size of a real capture,
not only at test size. The teacher is not needed: the signals are synthetic (12 draws per token
from a peaked distribution, unique ids + counts, as a real sampled-12 pass writes them), and go
through the real `StoreWriter`.

Measures (one row each in the table; the JSON last line carries them and the targets):
- writer tokens/s (the data is generated before the clock starts);
- `kdcache inspect` wall time (a fresh process), and `kdcache plan` with `--plan-config`
  (plan tokenises the corpus and reads no store byte, so it is timed only on a real config);
- `kdcache verify` (in-process `verify_store`, and the CLI with its start-up) against `cat` of
  the same files to /dev/null, with the page cache warm and evicted (posix_fadvise);
- KDStream tokens/s per core (CPU time) over a whole epoch, verification on (first reads hash
  every file) and off (verdicts already cached, so nothing is hashed), each in a fresh process,
  with the page cache warm, in two rounds of opposite order (each mode's best epoch counts);
- time to the first training batch (structural check + stream + first batch) against a one-shard
  store, the median of 7 fresh processes each, alternating; the reader's peak RSS over an epoch
  against a store a tenth the size (at least the
  shards the shuffle buffer spans, so both are at steady state).

    python -m bench.scale                   # 10^8 tokens (about 1.7 GB, a few minutes)
    python -m bench.scale --tokens 2000000  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import log, proc_status_kb, reset_peak_rss
from kdstore.spec import Provenance, SampledSpec, StoreSpec

VOCAB = 151_936
DRAWS = 12
POOL = 4  # distinct synthetic shards, cycled under new sample ids
BUFFER_ROWS = 1024  # KDStream's shuffle buffer (its default, and the trainer's)
TARGETS = {"verify_vs_cat": 1.5, "stream_verify_vs_off": 0.9, "tokens_per_s_per_core": 1e6,
           "first_batch_vs_one_shard": 2.0, "rss_big_vs_small": 1.10, "wall_s": 600}


def synthetic_rows(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    """One shard of sampled-12 rows: per token 12 draws from a peaked (geometric) distribution
    over 32 candidate ids, stored as sorted unique ids with counts (count 0 = padding)."""
    input_ids = rng.integers(0, VOCAB, size=(rows, length), dtype=np.int64)
    rank = np.minimum(rng.geometric(0.35, size=(rows, length, DRAWS)) - 1, 31)
    drawn = np.sort((input_ids[..., None] * 7919 + rank * 104_729) % VOCAB, axis=-1)
    first = np.ones(drawn.shape, dtype=bool)
    first[..., 1:] = drawn[..., 1:] != drawn[..., :-1]
    slot = np.cumsum(first, axis=-1) - 1
    flat = (np.arange(rows * length)[:, None] * DRAWS + slot.reshape(-1, DRAWS)).ravel()
    counts = np.bincount(flat, minlength=rows * length * DRAWS).reshape(drawn.shape)
    ids = np.zeros(drawn.shape, dtype=np.int64)
    ids.reshape(-1)[flat.reshape(drawn.shape)[first]] = drawn[first]
    lengths = np.full(rows, length)
    lengths[::7] = length - rng.integers(1, length // 2, size=len(lengths[::7]))  # some padded rows
    valid = np.arange(length)[None, :] < lengths[:, None]
    return {"sample_id": np.arange(rows, dtype=np.int64), "input_ids": input_ids, "valid": valid,
            "doc_ids": np.cumsum(rng.random((rows, length)) < 0.002, axis=1, dtype=np.int32),
            "draw_ids": ids, "draw_counts": counts}


def build(root: Path, tokens: int, row_length: int, shard_rows: int) -> dict:
    from kdstore.writer import StoreWriter

    spec = StoreSpec(vocab_size=VOCAB, row_length=row_length, shard_rows=shard_rows, sampled=SampledSpec(n_draws=DRAWS))
    provenance = Provenance(teacher={"name": "synthetic-sampled-12"}, corpus={"source": "bench.scale"},
                            packing={"row_length": row_length})
    shards = max(1, -(-tokens // (row_length * shard_rows)))
    rng = np.random.default_rng(0)
    pool = [synthetic_rows(rng, shard_rows, row_length) for _ in range(min(POOL, shards))]
    writer = StoreWriter(root, spec, provenance)
    started = time.perf_counter()
    for i in range(shards):
        rows = dict(pool[i % len(pool)], sample_id=np.arange(i * shard_rows, (i + 1) * shard_rows, dtype=np.int64))
        writer.write_shard(f"s{i:06d}", rows)
        if i % 50 == 0:
            log(f"wrote shard {i + 1}/{shards}", "scale")
    wall = time.perf_counter() - started
    written = shards * shard_rows * row_length
    return {"shards": shards, "tokens": written, "write_s": wall, "writer_tokens_per_s": written / wall,
            "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file())}


def sub_store(big: Path, root: Path, shards: int) -> Path:
    """A store of the first `shards` shards of `big` (hard links: no bytes copied)."""
    (root / "shards").mkdir(parents=True)
    shutil.copy(big / "store.json", root / "store.json")
    for name in sorted(p.name for p in (big / "shards").iterdir())[:shards]:
        shutil.copytree(big / "shards" / name, root / "shards" / name, copy_function=os.link)
    return root


def store_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (needs no privileges)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cli(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def verify_vs_cat(root: Path, cold: bool) -> dict:
    from kdstore.verify import verify_store

    files = store_files(root)

    def cat() -> None:
        subprocess.run(["cat", *files], check=True, stdout=subprocess.DEVNULL)

    def verify() -> None:
        assert verify_store(str(root)).ok

    out = {}
    for name, fn in (("cat_s", cat), ("verify_s", verify)):
        if cold:
            evict(files)
        else:
            fn()  # warm the page cache (and the code)
        out[name] = timed(fn)
    out["ratio"] = out["verify_s"] / out["cat_s"]
    return out


def child(args: argparse.Namespace) -> None:
    """One fresh reader process: structural check, a KDStream epoch; prints one JSON line."""
    import torch

    from kdstore.digest import file_key, remember_good
    from kdstore.reader import StoreReader
    from kdstore.torch_stream import KDStream
    from kdstore.verify import check_structure

    torch.set_num_threads(1)
    reset_peak_rss()
    base_kb = proc_status_kb("VmRSS")
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if args.verify == "off":  # every verdict already cached: the epoch reads and decodes, hashes nothing
        reader = StoreReader(args.child)
        for shard in reader.shard_ids():
            for rel, expected in reader.record(shard).files.items():
                path = reader.location.path("shards", shard, rel)
                remember_good(file_key(path, expected.digest, os.stat(path)))
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    assert check_structure(args.child).ok
    stream = KDStream(args.child, ["input_ids", "valid", "draw_ids", "draw_counts"], args.batch_size, seed=0,
                      buffer_rows=BUFFER_ROWS, rank=0, world_size=1)
    first, tokens = None, 0
    for batch in stream:
        if first is None:
            first = time.perf_counter() - wall0
        tokens += batch["input_ids"].numel()
        if args.first_only:
            break
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"first_batch_s": first, "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
                      "tokens_per_s_per_core": tokens / max(cpu, 1e-9), "peak_rss_kb": proc_status_kb("VmHWM"),
                      "rss_before_kb": base_kb}))


def run_child(store: Path, verify: str, batch_size: int, first_only: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "bench.scale", "--child", str(store), "--verify", verify,
           "--batch-size", str(batch_size)] + (["--first-only"] if first_only else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=1e8)
    p.add_argument("--row-length", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="where to build the stores (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    p.add_argument("--plan-config", default=None, help="a cache config to time `kdcache plan` on")
    p.add_argument("--epoch-rounds", type=int, default=2, choices=(1, 2),
                   help="verify on/off epoch pairs, the second in the other order (each mode's best CPU time counts)")
    p.add_argument("--first-rounds", type=int, default=7, help="first-batch runs per store, alternating (medians)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--verify", default="on", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    started = time.perf_counter()
    work = args.out or Path(tempfile.mkdtemp(prefix="kdcache-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        big = work / "big"
        shutil.rmtree(big, ignore_errors=True)
        log(f"writing {int(args.tokens):,} tokens to {big}", "scale")
        written = build(big, int(args.tokens), args.row_length, args.shard_rows)
        # a tenth of the store, but past what the shuffle buffer spans (else it is not steady state)
        span = -(-4 * BUFFER_ROWS // args.shard_rows) + 1
        small_shards = min(written["shards"], max(written["shards"] // 10, span))
        for name in ("small", "one"):
            shutil.rmtree(work / name, ignore_errors=True)
        small = sub_store(big, work / "small", small_shards)
        one = sub_store(big, work / "one", 1)
        result = {"tokens": written["tokens"], "shards": written["shards"], "store_bytes": written["bytes"],
                  "bytes_per_token": written["bytes"] / written["tokens"],
                  "writer_tokens_per_s": written["writer_tokens_per_s"], "write_s": written["write_s"]}
        result["inspect_s"] = cli("inspect", str(big), "--json")
        result["plan_s"] = cli("plan", args.plan_config) if args.plan_config else None
        result["verify_cli_s"] = cli("verify", str(big))
        log("verify against cat", "scale")
        result["warm"] = verify_vs_cat(big, cold=False)
        result["cold"] = verify_vs_cat(big, cold=True)
        log("reader epochs (fresh processes, page cache warm, on/off interleaved)", "scale")
        subprocess.run(["cat", *store_files(big)], check=True, stdout=subprocess.DEVNULL)
        epochs: dict[str, list[dict]] = {"on": [], "off": []}
        for order in (("on", "off"), ("off", "on"))[:args.epoch_rounds]:
            for mode in order:
                epochs[mode].append(run_child(big, mode, args.batch_size))
        on, off = (min(epochs[m], key=lambda r: r["cpu_s"]) for m in ("on", "off"))
        on_off = [a["tokens_per_s_per_core"] / b["tokens_per_s_per_core"] for a, b in zip(epochs["on"], epochs["off"], strict=True)]
        small_run = run_child(small, "on", args.batch_size)
        firsts: dict[str, list[float]] = {"one": [], "big": []}
        for i in range(args.first_rounds):
            for name in (("one", "big"), ("big", "one"))[i % 2]:
                store = one if name == "one" else big
                firsts[name].append(run_child(store, "on", args.batch_size, first_only=True)["first_batch_s"])
        first_one, first_big = float(np.median(firsts["one"])), float(np.median(firsts["big"]))
        result.update({
            "stream_on": on, "stream_off": off, "stream_on_off_per_round": on_off, "small_shards": small_shards,
            "tokens_per_s_per_core_on": on["tokens_per_s_per_core"],
            "tokens_per_s_per_core_off": off["tokens_per_s_per_core"],
            "stream_verify_vs_off": on["tokens_per_s_per_core"] / off["tokens_per_s_per_core"],
            "first_batch_runs_s": firsts, "first_batch_s": first_big, "first_batch_one_shard_s": first_one,
            "first_batch_vs_one_shard": first_big / first_one,
            "peak_rss_kb": on["peak_rss_kb"], "peak_rss_small_kb": small_run["peak_rss_kb"],
            "rss_big_vs_small": on["peak_rss_kb"] / small_run["peak_rss_kb"],
        })
        result["wall_s"] = time.perf_counter() - started
        checks = {
            "verify_vs_cat": result["warm"]["ratio"] <= TARGETS["verify_vs_cat"],
            "verify_vs_cat_cold": result["cold"]["ratio"] <= TARGETS["verify_vs_cat"],
            "stream_verify_vs_off": result["stream_verify_vs_off"] >= TARGETS["stream_verify_vs_off"],
            "tokens_per_s_per_core": result["tokens_per_s_per_core_on"] >= TARGETS["tokens_per_s_per_core"],
            "first_batch_vs_one_shard": result["first_batch_vs_one_shard"] <= TARGETS["first_batch_vs_one_shard"],
            "rss_big_vs_small": abs(result["rss_big_vs_small"] - 1) <= TARGETS["rss_big_vs_small"] - 1,
            "wall_s": result["wall_s"] <= TARGETS["wall_s"],
        }
        result.update(targets=TARGETS, met=checks)
        print_table(result)
        print(json.dumps(result))
        return result
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(work, ignore_errors=True)


def print_table(r: dict) -> None:
    rows = [
        ("store", f"{r['tokens']:,} tokens, {r['shards']} shards, {r['store_bytes'] / 1e9:.2f} GB, "
                  f"{r['bytes_per_token']:.1f} B/token"),
        ("writer", f"{r['writer_tokens_per_s']:,.0f} tokens/s ({r['write_s']:.1f} s)"),
        ("kdcache inspect", f"{r['inspect_s']:.2f} s (fresh process)"),
        ("kdcache plan", "not timed (reads no store byte; --plan-config CONFIG)" if r["plan_s"] is None
         else f"{r['plan_s']:.2f} s"),
        ("kdcache verify (CLI)", f"{r['verify_cli_s']:.2f} s, start-up included"),
        ("verify / cat, warm", f"{r['warm']['verify_s']:.2f} s / {r['warm']['cat_s']:.2f} s = {r['warm']['ratio']:.2f}x"),
        ("verify / cat, cold", f"{r['cold']['verify_s']:.2f} s / {r['cold']['cat_s']:.2f} s = {r['cold']['ratio']:.2f}x"),
        ("KDStream verify on", f"{r['tokens_per_s_per_core_on']:,.0f} tokens/s/core"),
        ("KDStream verify off", f"{r['tokens_per_s_per_core_off']:,.0f} tokens/s/core "
                                f"(on/off {r['stream_verify_vs_off']:.3f})"),
        ("first batch", f"{r['first_batch_s']:.3f} s vs one shard {r['first_batch_one_shard_s']:.3f} s "
                        f"= {r['first_batch_vs_one_shard']:.2f}x"),
        ("reader peak RSS", f"{r['peak_rss_kb'] / 1024:.0f} MiB vs {r['peak_rss_small_kb'] / 1024:.0f} MiB "
                            f"({r['small_shards']} shards) = {r['rss_big_vs_small']:.3f}x"),
        ("whole bench", f"{r['wall_s']:.0f} s"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["met"].items()))


if __name__ == "__main__":
    main()
