"""The teacher pass: corpus rows in, committed shards out. Runs the teacher once.

Plan: each corpus file is packed into rows and cut into shards named by the file's content
digest, so adding a file adds only its shards and changing a file redoes only its own.
Per shard: batched no-grad forward passes, signal extraction on the device, then the write,
which runs outside the device lock so the next shard's forward pass overlaps it (the Prefect
flow runs two shards at a time; `run_cache` uses a writer thread behind a bounded queue).
The forward runs the teacher's base model; its head is applied to the last hidden state one
chunk of tokens at a time (`chunked_logits`), top-k, draws and log-sum-exp taken per chunk, so
no [tokens, V] logits tensor exists (unless the head is not a plain linear layer:
`model_head.fusable_head`). The stored results equal the whole-logits path's.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdstore.errors import NotEnoughSpaceError
from kdstore.records import SHARDS_DIR
from kdstore.spec import StoreSpec
from kdstore.summary import summarize
from kdstore.writer import StoreWriter
from pipeline.capture import extract
from pipeline.capture.devices import is_out_of_memory, out_of_memory
from pipeline.capture.model_head import fusable_head
from pipeline.capture.pass_setup import Teacher, open_writer, teacher_for
from pipeline.capture.shard_plan import ShardPlan, field_bytes_per_token, plan_shards
from pipeline.capture.teacher_files import write_teacher_files
from pipeline.config import CacheConfig

DEVICE_LOCK = threading.Lock()


# ---------------------------------------------------------------- one shard


def compute_shard(teacher: Teacher, spec: StoreSpec, plan: ShardPlan, batch_size: int, seed: int = 0,
                  chunked: bool = True) -> dict[str, np.ndarray]:
    """Run the teacher over one shard's rows; returns the arrays the store writer takes.
    `chunked`: the head per chunk of tokens when the model allows it (False: whole logits)."""
    rows = plan.rows
    n = len(rows.sample_ids)
    out: dict[str, list[np.ndarray]] = {}
    model = teacher.model
    head = model.get_output_embeddings().weight
    generator = None  # on the head's device: where the draws are taken (the last one under a device_map)
    if spec.sampled is not None:
        generator = _generator(head.device, f"{spec.sampled.seed}:{plan.shard_id}")
    tail_generator = None
    if spec.tail_sample is not None:  # its own stream: adding tail draws never changes the sampled ones
        tail_generator = _generator(head.device, f"tail:{spec.tail_sample.seed}:{plan.shard_id}")
    want_hidden = spec.hidden is not None
    want_attn = spec.attention is not None
    chunked = chunked and (spec.topk is not None or spec.sampled is not None) and fusable_head(model) is None
    forward = model.get_decoder() if chunked else model
    for start in range(0, n, batch_size):
        ids = torch.from_numpy(rows.input_ids[start : start + batch_size].astype(np.int64)).to(teacher.device)
        try:
            with torch.inference_mode():
                result = forward(
                    input_ids=ids, output_hidden_states=want_hidden, output_attentions=want_attn, use_cache=False
                )
                logits = chunked_logits(result.last_hidden_state, head) if chunked else None
                for name, value in extract_signals(result, spec, generator, logits, tail_generator).items():
                    out.setdefault(name, []).append(value)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if is_out_of_memory(exc):
                raise out_of_memory(plan.shard_id, batch_size, teacher.device) from None
            raise
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays.update(
        sample_id=rows.sample_ids.astype(np.int64),
        input_ids=rows.input_ids,
        doc_ids=rows.doc_ids,
        valid=rows.valid,
    )
    if spec.text:
        arrays.update(text=rows.text, char_end=rows.char_end)
    if spec.loss_mask:
        arrays["loss_mask"] = rows.loss_mask
    return arrays


def _generator(device: Any, key: str) -> torch.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def chunked_logits(hidden: torch.Tensor, head: torch.Tensor) -> Iterator[torch.Tensor]:
    """head(hidden) for [B,T,d] hidden, as [n, V] chunks of extract.TOKEN_CHUNK tokens in order
    (the chunks `extract` takes anyway, so draws consume the generator as with whole logits)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    for start in range(0, flat.shape[0], extract.TOKEN_CHUNK):
        yield torch.nn.functional.linear(flat[start : start + extract.TOKEN_CHUNK], head)


def extract_signals(result: Any, spec: StoreSpec, generator: torch.Generator | None,
                    logits: Any = None, tail_generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """The store arrays of one batch (`extract_tensors`, moved to the host)."""
    return {k: extract.to_numpy(v) for k, v in extract_tensors(result, spec, generator, logits, tail_generator).items()}


def extract_tensors(result: Any, spec: StoreSpec, generator: torch.Generator | None,
                    logits: Any = None, tail_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The store fields of one batch as tensors on the teacher's device. `logits`: [B,T,V] chunks in
    token order (default: the result's whole logits); top-k and draws are taken chunk by chunk,
    then reshaped to [B,T,..]."""
    chunks = [result.logits] if logits is None else logits
    batch_shape = (result.logits if logits is None else result.last_hidden_state).shape[:2]
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(named: tuple[tuple[str, torch.Tensor], ...], chunk: torch.Tensor) -> None:
        for key, value in named:
            parts.setdefault(key, []).append(value.reshape(-1, *value.shape[chunk.dim() - 1:]))

    t, d = spec.topk, spec.sampled
    for chunk in chunks:
        if t is not None:
            ids, logp, tail = extract.topk_logprobs(chunk, t.k, t.temperature, t.top_p if t.sampler == "topp_k" else None)
            keep((("topk_ids", ids), ("topk_logp", logp), ("topk_tail", tail)), chunk)
            if (ts := spec.tail_sample) is not None:
                inside_tail = extract.tail_draws(chunk, ids, logp, ts.n_draws, t.temperature, tail_generator, ts.scheme)
                keep(tuple(zip(("tail_ids", "tail_counts"), inside_tail, strict=True)), chunk)
        if d is not None:
            draws = extract.sampled_draws(chunk, d.n_draws, d.temperature, generator, d.scheme)
            keep(tuple(zip(("draw_ids", "draw_counts"), draws, strict=True)), chunk)
    for key, values in parts.items():
        joined = torch.cat(values)
        out[key] = joined.reshape(*batch_shape, *joined.shape[1:])
    if spec.hidden is not None:
        for layer in spec.hidden.layers:
            out[f"hidden_{layer}"] = result.hidden_states[layer].float()
    if spec.attention is not None:
        a = spec.attention
        for layer in a.layers:
            for suffix, value in extract.attention_rows(result.attentions[layer], a.heads, a.topk).items():
                out[f"attn_{layer}{suffix}"] = value
    return out


def cache_shard(config: CacheConfig, plan: ShardPlan) -> dict[str, Any]:
    """One unit of work (a flow task): skip when committed and valid, else compute and commit."""
    teacher = teacher_for(config)
    writer = open_writer(config, teacher)
    if (done := writer.committed(plan.shard_id)) is not None:
        return {"shard_id": plan.shard_id, "skipped": True, "tokens": done.tokens, "bytes": done.bytes}
    with DEVICE_LOCK:  # the device runs one shard at a time; writing happens outside the lock
        arrays = compute_shard(teacher, writer.meta.spec, plan, config.teacher.batch_size)
    result = writer.write_shard(plan.shard_id, arrays, meta=plan.meta())
    print(f"  shard {plan.shard_id}: {result.record.tokens} tokens, {result.record.bytes / result.record.tokens:.1f} B/token", flush=True)
    return {"shard_id": plan.shard_id, "skipped": result.skipped, "tokens": result.record.tokens, "bytes": result.record.bytes}


# ---------------------------------------------------------------- whole pass without Prefect


@dataclass(frozen=True, eq=False)
class PassPlan:
    teacher: Teacher
    writer: StoreWriter
    plans: list[ShardPlan]
    todo: list[ShardPlan]  # planned shards not yet committed and valid
    retired: list[str]


def prepare_pass(config: CacheConfig, progress: Callable[[str], None] | None = print,
                 force: bool = False) -> PassPlan:
    """Open the store, clean crash leftovers, plan, check the disk has room for what is left
    (unless `force`), write teacher/ once, retire stale shards."""
    teacher = teacher_for(config)
    writer = open_writer(config, teacher)
    writer.cleanup_stale()
    plans = plan_shards(config, teacher.tokenizer)
    todo = [p for p in plans if writer.committed(p.shard_id) is None]
    if not force:
        check_free_space(writer, todo, config.row_length, teacher)
    write_teacher_files(writer, teacher, plans[0].rows if plans else None, config.teacher.batch_size)
    retired = retire_stale_shards(writer, plans)
    if progress:
        progress(f"{len(plans)} shards planned, {len(plans) - len(todo)} already committed, {len(todo)} to compute")
    return PassPlan(teacher, writer, plans, todo, retired)


def check_free_space(writer: StoreWriter, todo: list[ShardPlan], row_length: int, teacher: Teacher) -> None:
    """Refuse a pass whose shards still to compute (by `kdcache plan`'s estimate), plus the
    teacher's head and embeddings when teacher/ is not written yet, need more than the store's
    disk has free (object stores: no check)."""
    free = writer.location.free_bytes()
    if free is None or not todo:
        return
    tokens = sum(p.rows.num_rows for p in todo) * row_length
    needed = int(sum(field_bytes_per_token(writer.meta.spec)[1].values()) * tokens)
    if not writer.teacher_committed():  # float16 head (+ input embeddings when untied)
        tables = 1 if teacher.facts["tied_embeddings"] else 2
        needed += 2 * tables * teacher.model.get_output_embeddings().weight.numel()
    if needed > free:
        raise NotEnoughSpaceError(
            f"store {writer.location.url!r}: the pass needs about {needed:,} bytes ({len(todo)} shard(s) by "
            f"`kdcache plan`'s estimate, and teacher/), the disk has {free:,} free: free space or choose another "
            "store (`--force` starts anyway; a full disk then stops the pass, committed shards kept)")


def run_cache(config: CacheConfig, progress: Callable[[str], None] | None = print,
              force: bool = False) -> dict[str, Any]:
    """The teacher pass as a plain function: a forward loop and a writer thread (queue of 2).
    `force`: start even when the disk looks too small for the plan."""
    started = time.perf_counter()
    p = prepare_pass(config, progress, force)
    pass_started = time.perf_counter()  # the rate counts the pass, not the one-time set-up
    results = cache_pipelined(p.teacher, p.writer, p.todo, config, progress, pass_started)
    done = time.perf_counter()
    return pass_summary(config.store, p.plans, results, p.retired, done - started, done - pass_started)


def cache_pipelined(
    teacher: Teacher, writer: StoreWriter, todo: list[ShardPlan], config: CacheConfig,
    progress: Callable[[str], None] | None = None, started: float | None = None,
) -> list[dict[str, Any]]:
    """Forward passes in this thread, writes in a writer thread behind a queue of 2 shards."""
    started = time.perf_counter() if started is None else started
    results: list[dict[str, Any]] = []
    pending: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (item := pending.get()) is not None:
            plan, arrays = item
            try:
                r = writer.write_shard(plan.shard_id, arrays, meta=plan.meta())
                results.append({"shard_id": plan.shard_id, "tokens": r.record.tokens, "bytes": r.record.bytes})
            except BaseException as exc:  # surfaced in the calling thread below
                failure.append(exc)

    thread = threading.Thread(target=write_loop, name="kdcache-writer", daemon=True)
    thread.start()
    try:
        for arrays, plan in _timed(todo, teacher, writer, config, progress, started):
            if failure:
                break
            pending.put((plan, arrays))
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return results


def _timed(todo, teacher, writer, config, progress, started) -> Iterator[tuple[dict[str, np.ndarray], ShardPlan]]:
    total_tokens = sum(len(p.rows.sample_ids) for p in todo) * config.row_length
    done = 0
    for i, plan in enumerate(todo):
        arrays = compute_shard(teacher, writer.meta.spec, plan, config.teacher.batch_size)
        done += len(plan.rows.sample_ids) * config.row_length
        if progress:
            elapsed = time.perf_counter() - started
            rate = done / max(elapsed, 1e-9)
            eta = (total_tokens - done) / max(rate, 1e-9)
            progress(f"[{i + 1}/{len(todo)}] shard {plan.shard_id}: {done}/{total_tokens} tokens, {rate:,.0f} tok/s, ETA {eta:,.0f} s")
        yield arrays, plan


def retire_stale_shards(writer: StoreWriter, plans: list[ShardPlan]) -> list[str]:
    """Shards of files no longer in the corpus (changed or removed) are moved aside, not deleted."""
    wanted = {p.shard_id for p in plans}
    retired = []
    for name in writer.location.list_dirs(SHARDS_DIR):
        if not name.startswith(".") and name not in wanted:
            writer.retire_shard(name)
            retired.append(name)
    return retired


def pass_summary(store: str, plans: list[ShardPlan], results: list[dict[str, Any]], retired: list[str], wall_s: float,
                 pass_s: float | None = None) -> dict[str, Any]:
    """The store's summary plus this pass's figures. `wall_s`: everything (teacher load and
    conversion, planning, the pass); `pass_s`: the forward passes and writes alone, which
    `teacher_tokens_per_s` counts (default: wall_s)."""
    summary = summarize(store)
    pass_s = wall_s if pass_s is None else pass_s
    computed_tokens = sum(r["tokens"] for r in results)
    return {
        "store": store,
        "fingerprint": summary.fingerprint,
        "shards": summary.shards,
        "shards_computed": len(results),
        "shards_skipped": len(plans) - len(results),
        "shards_retired": len(retired),
        "tokens": summary.tokens,
        "tokens_computed": computed_tokens,
        "bytes": summary.bytes_total,
        "bytes_per_token": round(summary.bytes_per_token, 2),
        "mean_kept_mass": summary.mean_kept_mass,
        "wall_s": round(wall_s, 2),
        "setup_s": round(wall_s - pass_s, 2),
        "pass_s": round(pass_s, 2),
        "teacher_tokens_per_s": round(computed_tokens / max(pass_s, 1e-9), 1) if results else None,
    }
