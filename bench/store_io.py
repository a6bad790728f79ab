"""Stores, fidelity and speed for the store benchmark (`bench/store.py`): write a store of each
sparsifier from the signals, measure bytes/token from the commit records, KL(exact || stored),
and the writer's and reader's speed on tiled teacher data.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core for the speed measurements (the teacher pass asks for more)

import cProfile  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import log  # noqa: E402
from bench.store_signals import FIELDS_TOPK, ROW, TOPK_FILES, Signals  # noqa: E402
from kdstore.reader import StoreReader  # noqa: E402
from kdstore.spec import Provenance, SampledSpec, StoreSpec, TailSampleSpec, TopKSpec  # noqa: E402
from kdstore.summary import summarize  # noqa: E402
from kdstore.torch_stream import KDStream  # noqa: E402
from kdstore.writer import StoreWriter  # noqa: E402

# ----------------------------------------------------------------------------- stores


def unique_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: unique ids (ascending) + counts, packed at the front, count-0 padding after."""
    shape = draws.shape
    d = np.sort(draws.reshape(-1, shape[-1]), axis=1)
    new = np.ones(d.shape, bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = np.cumsum(new, axis=1) - 1
    rows = np.repeat(np.arange(len(d)), shape[-1])
    ids = np.zeros(d.shape, np.int64)
    counts = np.zeros(d.shape, np.int64)
    ids[rows, slot.ravel()] = d.ravel()
    np.add.at(counts, (rows, slot.ravel()), 1)
    return ids.reshape(shape), counts.reshape(shape)


def base_rows(sig: Signals, start: int, stop: int) -> dict[str, np.ndarray]:
    n = stop - start
    return {
        "sample_id": np.arange(start, stop, dtype=np.int64),
        "input_ids": sig.input_ids[start:stop],
        "doc_ids": np.zeros((n, ROW), np.int32),
        "valid": np.ones((n, ROW), bool),
    }


ZSTD_LEVEL: int | None = None  # --zstd-level; None keeps StoreSpec's default


def store_spec(
    vocab: int, shard_rows: int, k: int | None = None, n_draws: int | None = None, tail_draws: int | None = None
) -> StoreSpec:
    extra: dict = {} if ZSTD_LEVEL is None else {"zstd_level": ZSTD_LEVEL}
    if tail_draws:
        extra["tail_sample"] = TailSampleSpec(n_draws=tail_draws)
    return StoreSpec(
        vocab_size=vocab,
        row_length=ROW,
        shard_rows=shard_rows,
        topk=TopKSpec(k=k) if k else None,
        sampled=SampledSpec(n_draws=n_draws) if n_draws else None,
        **extra,
    )


def provenance(sig: Signals) -> Provenance:
    return Provenance(
        teacher={"name": sig.source},
        corpus={"source": "bench/store.py", "note": sig.note},
        packing={"row_length": ROW},
    )


def write_store(
    path: Path,
    sig: Signals,
    *,
    k: int | None = None,
    n_draws: int | None = None,
    tail_draws: int | None = None,
    shard_rows: int = 16,
) -> None:
    """A store of one sparsifier: top-k (k), sampled (n_draws), or the hybrid (k + tail_draws,
    the signals' tail draws past their top HYBRID_K: k must be HYBRID_K)."""
    writer = StoreWriter(path, store_spec(sig.vocab, shard_rows, k, n_draws, tail_draws), provenance(sig))
    if n_draws:
        draw_ids, draw_counts = unique_counts(sig.draws)
    if tail_draws:
        tail_ids, tail_counts = unique_counts(sig.tail_draws[..., :tail_draws])
    for i, start in enumerate(range(0, sig.rows, shard_rows)):
        stop = min(start + shard_rows, sig.rows)
        rows = base_rows(sig, start, stop)
        if k:
            rows.update(
                topk_ids=sig.ids[start:stop, :, :k],
                topk_logp=sig.logp[start:stop, :, :k].astype(np.float32),
                topk_tail=sig.tail(k)[start:stop].astype(np.float32),
            )
        if n_draws:
            rows.update(draw_ids=draw_ids[start:stop], draw_counts=draw_counts[start:stop])
        if tail_draws:
            rows.update(tail_ids=tail_ids[start:stop], tail_counts=tail_counts[start:stop])
        writer.write_shard(f"{i:05d}", rows)


def topk_fidelity(path: Path, sig: Signals, k: int) -> dict[str, float]:
    """KL(exact || stored) per token (nats), exact = kept probabilities + exact tail."""
    reader = StoreReader(path)
    parts = [reader.read_shard(s, ["sample_id", *FIELDS_TOPK]) for s in reader.shard_ids()]
    got = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(got["sample_id"])
    ids, logp_q, tail_q = (got[name][order] for name in FIELDS_TOPK)
    if not np.array_equal(ids, sig.ids[..., :k]):
        raise AssertionError(f"{path}: stored top-{k} ids differ from the ids written")
    p_kept = np.exp(sig.logp[..., :k])
    p_tail = sig.tail(k)
    q_kept = np.exp(logp_q.astype(np.float64))
    q_tail = tail_q.astype(np.float64)
    log_zq = np.log(q_kept.sum(axis=-1) + q_tail)
    kl = (p_kept * (sig.logp[..., :k] - np.log(q_kept) + log_zq[..., None])).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(p_tail > 0, p_tail * (np.log(p_tail) - np.log(q_tail) + log_zq), 0.0)
    kl = kl + tail_term
    return {
        "kl": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "kept": float((1 - p_tail).mean()),
    }


def sampled_check(path: Path, sig: Signals) -> float:
    """Round-trip check of the sampled draws; returns the mean unique draws per token."""
    reader = StoreReader(path)
    parts = [
        reader.read_shard(s, ["sample_id", "draw_ids", "draw_counts"]) for s in reader.shard_ids()
    ]
    got = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(got["sample_id"])
    ids, counts = unique_counts(sig.draws)
    if not (
        np.array_equal(got["draw_ids"][order], ids)
        and np.array_equal(got["draw_counts"][order], counts)
    ):
        raise AssertionError(f"{path}: sampled draws do not round-trip")
    return float((counts > 0).sum(axis=-1).mean())


def size_row(path: Path, sig: Signals, label: str, k: int | None, tail_draws: int | None = None) -> dict:
    summary = summarize(str(path))
    per = summary.bytes_per_field
    t = summary.tokens
    row = {
        "source": sig.source,
        "vocab": sig.vocab,
        "signal": label,
        "tokens": t,
        "store": summary.bytes_total / t,
    }
    if k:
        row.update({name: per[name] / t for name in TOPK_FILES})
        row["signal_bytes"] = sum(per[name] for name in TOPK_FILES) / t
        row.update(topk_fidelity(path, sig, k))
        if tail_draws:
            row["tail_draws"] = per["tail_draws"] / t
            row["signal_bytes"] += row["tail_draws"]
    else:
        row["signal_bytes"] = per["draws"] / t
        row["unique_draws"] = sampled_check(path, sig)
    return row


# ----------------------------------------------------------------------------- speed


def tiled_topk_rows(sig: Signals, n_rows: int, seed: int, k: int = 64) -> dict[str, np.ndarray]:
    """sig's top-k rows tiled to n_rows; each copy after the first has its ids XOR-scrambled in
    the low bits (same magnitudes, no repeats) and its log-probs jittered by < 1 quantisation step
    and re-sorted, so zstd sees no copy of a previous tile."""
    rng = np.random.default_rng(seed)
    copies = math.ceil(n_rows / sig.rows)
    mask_bits = 127 if sig.vocab % 128 == 0 else 0
    keys = rng.permutation(np.arange(1, 128))[: copies - 1] if mask_bits else []
    ids, logp, tail, inp = [], [], [], []
    for c in range(copies):
        i = sig.ids[..., :k]
        lp = sig.logp[..., :k].astype(np.float32)
        t = sig.tail(k).astype(np.float32)
        x = sig.input_ids
        if c > 0:
            key = int(keys[(c - 1) % len(keys)]) if mask_bits else 0
            i, x = i ^ key, x ^ key
            lp = np.minimum(lp + rng.uniform(-1 / 32, 1 / 32, lp.shape).astype(np.float32), 0)
            o = np.argsort(-lp, axis=-1, kind="stable")
            i, lp = np.take_along_axis(i, o, -1), np.take_along_axis(lp, o, -1)
            t = np.clip(t * (1 + rng.uniform(-1e-3, 1e-3, t.shape)).astype(np.float32), 0, 1)
        ids.append(i)
        logp.append(lp)
        tail.append(t)
        inp.append(x)
    rows = {
        "sample_id": np.arange(n_rows, dtype=np.int64),
        "input_ids": np.concatenate(inp)[:n_rows],
        "doc_ids": np.zeros((n_rows, ROW), np.int32),
        "valid": np.ones((n_rows, ROW), bool),
        "topk_ids": np.concatenate(ids)[:n_rows],
        "topk_logp": np.concatenate(logp)[:n_rows],
        "topk_tail": np.concatenate(tail)[:n_rows],
    }
    return rows


def _timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def speed(sig: Signals, root: Path, n_rows: int, reps: int, profile: bool) -> dict:
    shard_rows = 256
    rows = tiled_topk_rows(sig, n_rows, seed=1)
    tokens = n_rows * ROW
    spec = store_spec(sig.vocab, shard_rows, k=64)
    prov = provenance(sig)
    shards = [
        (f"{i:05d}", {name: a[s : s + shard_rows] for name, a in rows.items()})
        for i, s in enumerate(range(0, n_rows, shard_rows))
    ]
    prof = cProfile.Profile() if profile else None
    write_times = []
    for rep in range(reps):
        path = root / f"speed-{rep}"
        shutil.rmtree(path, ignore_errors=True)
        writer = StoreWriter(path, spec, prov)

        def write_all(writer=writer):
            for shard_id, part in shards:
                writer.write_shard(shard_id, part)

        if prof is not None and rep == reps - 1:
            prof.enable()
        write_times.append(_timed(write_all))
        if prof is not None:
            prof.disable()
        log(f"write rep {rep}: {write_times[-1][0]:.2f} s wall, {write_times[-1][1]:.2f} s CPU")
        if rep < reps - 1:
            shutil.rmtree(path, ignore_errors=True)
    store = root / f"speed-{reps - 1}"
    summary = summarize(str(store))
    stream = KDStream(str(store), list(FIELDS_TOPK), batch_size=16, shuffle=False)
    reader = StoreReader(store)

    def read_stream():
        n = 0
        for batch in stream:
            n += batch["topk_ids"].shape[0] * ROW
            _ = batch["topk_logp"], batch["topk_tail"]
        assert n == tokens, (n, tokens)

    def read_plain():
        for shard_id in reader.shard_ids():
            reader.read_shard(shard_id, list(FIELDS_TOPK))

    stream_times, plain_times = [], []
    read_profile = cProfile.Profile() if profile else None
    for rep in range(max(reps, 3)):
        if read_profile is not None and rep == 0:
            read_profile.enable()
        stream_times.append(_timed(read_stream))
        if read_profile is not None and rep == 0:
            read_profile.disable()
        plain_times.append(_timed(read_plain))
        log(
            f"read rep {rep}: KDStream {stream_times[-1][0]:.2f} s wall, read_shard {plain_times[-1][0]:.2f} s wall"
        )
    if profile:
        for name, p in (("write", prof), ("read (KDStream)", read_profile)):
            buf = io.StringIO()
            pstats.Stats(p, stream=buf).sort_stats("tottime").print_stats(25)
            log(f"profile of {name}:\n{buf.getvalue()}")
    best = lambda ts, i: min(t[i] for t in ts)  # noqa: E731
    return {
        "tokens": tokens,
        "shards": len(shards),
        "topk_bytes_per_token": sum(summary.bytes_per_field[f] for f in TOPK_FILES) / tokens,
        "write": (best(write_times, 0), best(write_times, 1)),
        "stream": (best(stream_times, 0), best(stream_times, 1)),
        "plain": (best(plain_times, 0), best(plain_times, 1)),
    }


