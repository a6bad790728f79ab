"""`kdcache demo`: the main job on the embedded defaults, offline, in one command.

Today it runs the parts that exist: the `cache-teacher` flow (embedded SmolLM2-135M-Instruct
teacher over the built-in pydoc corpus), a full `verify` of the store, the `train-student` flow
(a student of 6 of the teacher's 30 layers, KD from the cache alone), and a report folder. A
second run reuses the cache (and the trained student) and says so. Evaluation against a
cross-entropy baseline joins it with the evaluation issue.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdstore.summary import summarize
from kdstore.verify import verify_store
from pipeline.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TRAIN_CONFIG = DEMO_CONFIG.with_name("train_demo.yaml")
DEFAULT_TOKENS = 32_768


def run_demo(out_dir: str = "runs/demo", tokens: int | None = None, steps: int | None = None,
             config_path: Path = DEMO_CONFIG) -> int:
    from flows.cache_teacher import cache_teacher
    from flows.train_student import train_student_flow
    from pipeline.trainer import TrainConfig

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    config = load_config(config_path, overrides={"store": str(store), "max_tokens": tokens or DEFAULT_TOKENS})
    started = time.perf_counter()
    print(f"[1/4] teacher pass: {config.teacher.name} teacher over the {config.corpus.kind} corpus → {store}")
    summary = cache_teacher(config.model_dump())
    if summary["shards_computed"] == 0:
        print(f"      cache reused: all {summary['shards']} shards were already committed, no teacher work done")
    else:
        print(f"      {summary['shards_computed']} shards computed at {summary['teacher_tokens_per_s']} tokens/s, "
              f"{summary['shards_skipped']} reused")
    print("[2/4] verifying every file of the store")
    report = verify_store(str(store))
    print(f"      {report.shards_checked} shards checked: {'clean' if report.ok else report.problems}")
    train_overrides = {"store": str(store), "out": str(out / "student_kd")}
    if steps is not None:
        train_overrides["steps"] = steps
    train_cfg = load_config(TRAIN_CONFIG, TrainConfig, overrides=train_overrides)
    print(f"[3/4] training a student from the cache alone ({train_cfg.student.num_layers} of the teacher's layers, "
          f"{train_cfg.steps} steps of {train_cfg.batch_size}×{config.row_length} tokens; no teacher in memory)")
    trained = train_student_flow(train_cfg.model_dump())
    if trained["last"]:
        last = trained["last"]
        print(f"      step {last['step']}: fkl {last.get('fkl', float('nan')):.3f}, ce {last.get('ce', float('nan')):.3f}, "
              f"{last['tokens_per_s']:,.0f} tokens/s → {trained['out']}")
    else:
        print(f"      student reused: its checkpoint is already at step {trained['steps']} ({trained['out']})")
    print("[4/4] writing the report")
    store_summary = summarize(str(store))
    report_md = out / "README.md"
    report_md.write_text(
        "# kdcache demo\n\n"
        + store_summary.to_markdown()
        + "\n\n## Teacher pass\n\n```json\n"
        + json.dumps(summary, indent=2)
        + "\n```\n\n## Student trained from the cache\n\n```json\n"
        + json.dumps(trained, indent=2)
        + "\n```\n"
    )
    (out / "summary.json").write_text(json.dumps({"teacher_pass": summary, "store": store_summary.to_json(), "student": trained}, indent=2))
    print(f"\n{store_summary.tokens:,} tokens cached at {store_summary.bytes_per_token:.1f} B/token "
          f"(mean kept mass {store_summary.mean_kept_mass:.3f}); {time.perf_counter() - started:.0f} s in all")
    print(f"report: {report_md}")
    return 0 if report.ok else 1
