"""Prefect flow `evaluate`: teacher, students and baseline on held-out rows, then the report.

One task computes the metrics (the models are loaded once, every model sees the same batches),
one writes the report folder; the table is published as a markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from pipeline.config import parse_config
from pipeline.evaluation.evaluate import EvalConfig, evaluate
from pipeline.evaluation.report import metrics_table, write_report


@task(name="evaluate-models", cache_policy=NONE)
def evaluate_task(config: dict[str, Any]) -> dict[str, Any]:
    return evaluate(parse_config(config, EvalConfig, "eval config"))


@task(name="write-report", cache_policy=NONE)
def report_task(result: dict[str, Any], config: dict[str, Any], bytes_by_k: list[dict[str, float]] | None,
                title: str, preamble: str) -> dict[str, str]:
    cfg = parse_config(config, EvalConfig, "eval config")
    written = write_report(result, cfg.out, title=title, train_logs=cfg.train_logs, bytes_by_k=bytes_by_k,
                           preamble=preamble)
    return {k: str(v) for k, v in written.items()}


@flow(name="evaluate")
def evaluate_flow(config: dict[str, Any], bytes_by_k: list[dict[str, float]] | None = None,
                  title: str = "kdcache evaluation", preamble: str = "") -> dict[str, Any]:
    cfg = parse_config(config, EvalConfig, "eval config")
    result = evaluate_task(cfg.model_dump())
    written = report_task(result, cfg.model_dump(), bytes_by_k, title, preamble)
    create_markdown_artifact(markdown=f"# {title}\n\n{metrics_table(result)}\n\nreport: {written['markdown']}\n",
                             key="kdcache-eval", description="kdcache evaluate")
    return {"result": result, "report": written}
