"""`kdcache demo`: the main job on the embedded defaults, offline, in one command.

A Prefect flow `kdcache-demo` runs, as sub-flows: `cache-teacher` (the embedded
SmolLM2-135M-Instruct teacher over the built-in pydoc corpus, train split), `train-student` twice
(the same student made of 6 of the teacher's 30 layers, chosen by greedy pruning, once with KD
from the cache alone, once with cross-entropy only: the baseline), and `evaluate` (teacher, KD student and baseline on the
held-out documents), which writes the report folder. A second run reuses the cache and the
trained students and says so; the evaluation is re-run (it is cheap).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from kdstore.summary import summarize, topk_bytes_by_k
from pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
TRAIN_CONFIG = CONFIGS / "train_demo.yaml"
EVAL_CONFIG = CONFIGS / "eval_demo.yaml"
DEFAULT_TOKENS = 32_768
BASELINE_LOSSES = [{"name": "ce"}]


def _train(label: str, store: Path, out: Path, losses: Any, steps: int | None,
           config: Path = TRAIN_CONFIG, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from flows.train_student import train_student_flow
    from pipeline.train.trainer import TrainConfig

    overrides: dict[str, Any] = {"store": str(store), "out": str(out)}
    if losses is not None:
        overrides["losses"] = losses
    if steps is not None:
        overrides["steps"] = steps
    overrides.update(extra or {})
    cfg = load_config(config, TrainConfig, overrides=overrides)
    names = " + ".join(f"{l_.weight:g}·{l_.name}" if l_.weight != 1 else l_.name
                       for l_ in (cfg.losses if isinstance(cfg.losses, list) else [cfg.losses]))
    print(f"      {label}: {names}, {cfg.steps} steps of {cfg.batch_size} row(s) → {out}", flush=True)
    trained = train_student_flow(cfg.model_dump())
    if trained["last"]:
        last = trained["last"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("step", "lr", "tokens_per_s"))
        print(f"      {label} step {last['step']}: {parts}; {last['tokens_per_s']:,.0f} tokens/s", flush=True)
    else:
        print(f"      {label} reused: its checkpoint is already at step {trained['steps']} ({trained['out']})", flush=True)
    return trained


@flow(name="kdcache-demo")
def demo_flow(out_dir: str = "runs/demo", tokens: int | None = None, steps: int | None = None,
              eval_tokens: int | None = None) -> dict[str, Any]:
    from flows.cache_teacher import cache_teacher
    from flows.evaluate import evaluate_flow
    from pipeline.evaluation.evaluate import EvalConfig

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    config = load_config(DEMO_CONFIG, overrides={"store": str(store), "max_tokens": tokens or DEFAULT_TOKENS})
    started = time.perf_counter()
    print(f"[1/4] teacher pass: {config.teacher.name} teacher over the {config.corpus.kind} corpus → {store}", flush=True)
    summary = cache_teacher(config.model_dump())
    if summary["shards_computed"] == 0:
        print(f"      cache reused: all {summary['shards']} shards were already committed, no teacher work done", flush=True)
    else:
        print(f"      {summary['shards_computed']} shards computed at {summary['teacher_tokens_per_s']} tokens/s, "
              f"{summary['shards_skipped']} reused; {summary['bytes_per_token']} B/token", flush=True)
    print("[2/4] training the same student twice from the cache alone (no teacher in memory); "
          "each run checks the store's structure first and every file as it reads it", flush=True)
    kd = _train("KD student", store, out / "student_kd", None, steps)
    ce = _train("CE baseline", store, out / "student_ce", BASELINE_LOSSES, steps)
    print("[3/4] evaluating teacher, KD student and CE baseline on held-out documents", flush=True)
    eval_overrides: dict[str, Any] = {
        "store": str(store), "out": str(out),
        "models": {"kd": str(out / "student_kd" / "model"), "ce": str(out / "student_ce" / "model")},
        "train_logs": {"kd": str(out / "student_kd" / "train_log.jsonl"),
                       "ce": str(out / "student_ce" / "train_log.jsonl")},
        "teacher": config.teacher.name,
    }
    if eval_tokens is not None:
        eval_overrides["max_tokens"] = eval_tokens
    eval_cfg = load_config(EVAL_CONFIG, EvalConfig, overrides=eval_overrides)
    store_summary = summarize(str(store))
    by_k = topk_bytes_by_k(str(store), [k for k in (4, 8, 16, 32, 64, 128) if k <= config.signals.topk.k])
    preamble = (f"Teacher `{config.teacher.name}` cached once over {store_summary.tokens:,} tokens of the "
                f"`{config.corpus.kind}` corpus ({store_summary.bytes_per_token:.1f} B/token, top-"
                f"{config.signals.topk.k} + exact tail, mean kept mass {store_summary.mean_kept_mass:.3f}). "
                f"`kd` and `ce` are the same student ({kd['student']}) trained for {kd['steps']} steps on the same "
                "batches, with KD from the cache and with cross-entropy only. Command: `kdcache demo`.")
    evaluated = evaluate_flow(eval_cfg.model_dump(), by_k, "kdcache demo", preamble)
    result = evaluated["result"]
    print("[4/4] report", flush=True)
    (out / "summary.json").write_text(json.dumps(
        {"teacher_pass": summary, "store": store_summary.to_json(), "students": {"kd": kd, "ce": ce},
         "eval": {k: {m: v for m, v in r.items() if m != "calibration"} for k, r in result["models"].items()}},
        indent=2))
    models = result["models"]
    for name in models:
        m = models[name]
        kl = f", KL to teacher {m['kl_to_teacher']:.3f}, top-1 agreement {m['top1_agreement']:.3f}" if "kl_to_teacher" in m else ""
        print(f"      {name:8s} perplexity {m['ppl']:8.2f}{kl}, ECE {100 * m['ece']:.2f} pts", flush=True)
    if "kd" in models and "ce" in models:
        kd_ppl, ce_ppl = models["kd"]["ppl"], models["ce"]["ppl"]
        change = f"{100 * (1 - kd_ppl / ce_ppl):.1f} % lower" if kd_ppl < ce_ppl else f"{100 * (kd_ppl / ce_ppl - 1):.1f} % HIGHER"
        print(f"      KD from the cache vs CE only: held-out perplexity {kd_ppl:.1f} vs {ce_ppl:.1f}, {change}", flush=True)
    print(f"\n{store_summary.tokens:,} tokens cached at {store_summary.bytes_per_token:.1f} B/token; "
          f"{time.perf_counter() - started:.0f} s in all", flush=True)
    print(f"report: {evaluated['report']['markdown']}", flush=True)
    return {"out": str(out), "report": evaluated["report"]["markdown"], "ppl": {k: m["ppl"] for k, m in models.items()}}


def run_demo(out_dir: str = "runs/demo", tokens: int | None = None, steps: int | None = None,
             eval_tokens: int | None = None) -> int:
    check_demo_args(out_dir, tokens=tokens, steps=steps, eval_tokens=eval_tokens)
    demo_flow(out_dir, tokens, steps, eval_tokens)
    return 0


def check_demo_args(out_dir: str, **counts: int | None) -> None:
    """Refuse bad arguments before Prefect starts (a ConfigError naming the option)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
