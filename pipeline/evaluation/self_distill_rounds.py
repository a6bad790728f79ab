"""Self-distillation rounds end to end: cache → train → score each round's student.

The round plans, configs and summary live in `pipeline.train.self_distill`; scoring a round needs
evaluation, so the whole loop lives here, the one stage allowed to use the other two.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import parse_config
from pipeline.train.self_distill import (
    RoundPlan,
    SelfDistillConfig,
    finite,
    plan_round,
    release_teachers,
    round_line,
    write_summary,
)


def evaluate_round(cfg: SelfDistillConfig, plan: RoundPlan, cached: dict[str, Any], trained: dict[str, Any],
                   progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Score the round's student (and its teacher, for KL and reference) on the held-out rows."""
    from kdstore.reader import StoreReader
    from pipeline.capture.teacher_source import resolve_teacher
    from pipeline.evaluation.evaluate import TEACHER, EvalConfig, evaluate

    teacher = None if plan.cache.teacher.revision else resolve_teacher(plan.cache.teacher.name)
    eval_cfg = EvalConfig(store=plan.cache.store, out=str(Path(plan.cache.store).parent), teacher=teacher,
                          models={plan.student: str(plan.student_model)}, max_tokens=cfg.eval_tokens,
                          batch_size=cfg.eval_batch_size, generation=None, device=cfg.train.device)
    result = evaluate(eval_cfg, progress=progress)
    student, teach = result["models"][plan.student], result["models"].get(TEACHER, {})
    provenance = StoreReader(plan.cache.store).meta.provenance.teacher
    return {
        "round": plan.index,
        "teacher": provenance.get("name", plan.teacher),  # as the store records it (a folder name, not a path)
        "teacher_weights_sha256": provenance.get("weights_sha256"),
        "store": plan.cache.store,
        "fingerprint": cached.get("fingerprint"),
        "shards_computed": cached.get("shards_computed"),
        "student": plan.student,
        "student_model": str(plan.student_model),
        "steps": trained.get("steps"),
        "trained_this_run": bool(trained.get("last")),  # False: the student was finished already
        "heldout_tokens": result["heldout_tokens"],
        "ppl": finite(student["ppl"]),
        "teacher_ppl": finite(teach.get("ppl")),
        "kl_to_teacher": finite(student.get("kl_to_teacher")),
        "top1_agreement": finite(student.get("top1_agreement")),
    }


def run_self_distill(cfg: SelfDistillConfig | dict[str, Any], progress: Callable[[str], None] | None = print
                     ) -> dict[str, Any]:
    """All rounds as plain function calls: cache → train → evaluate, then the summary files."""
    from pipeline.capture.teacher_pass import run_cache
    from pipeline.train.trainer import train

    cfg = cfg if isinstance(cfg, SelfDistillConfig) else parse_config(cfg, SelfDistillConfig, "self-distill config")
    say = progress or (lambda _: None)
    records = []
    for index in range(cfg.rounds):
        plan = plan_round(cfg, index)
        say(f"[round {index}] teacher {plan.teacher} → {plan.cache.store}")
        try:
            cached = run_cache(plan.cache, progress=progress)
        finally:
            release_teachers()
        say(f"[round {index}] training {plan.student} from it → {plan.train.out}")
        trained = train(plan.train, progress=progress is not None)
        records.append(evaluate_round(cfg, plan, cached, trained, progress))
        say(round_line(records[-1]))
    written = write_summary(cfg, records)
    say(written["table"])
    return written
