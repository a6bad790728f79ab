"""The `kdcache` command: one sub-command per step, each a thin call into a flow or a plain function.

It lives in `flows/` because it starts flows: imports go flows → pipeline → kdstore only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from kdstore.errors import StoreError
from pipeline.capture.corpus import CorpusError
from pipeline.config import ConfigError, parse_overrides
from pipeline.evaluation.evaluate import EvalError
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.losses import NonFiniteLossError
from pipeline.train.student import TokenizerMismatchError

# What a user can cause and fix (a config, a corpus, a store, a model folder, a checkpoint): one
# line naming what and where, exit code 2, no traceback unless --debug.
USER_ERRORS = (StoreError, ConfigError, CorpusError, CheckpointError, TokenizerMismatchError, NonFiniteLossError,
               EvalError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _verify(args: argparse.Namespace) -> int:
    from kdstore.verify import verify_store

    report = verify_store(args.store, check="size" if args.quick else "hash")
    for problem in report.problems:
        print(f"BAD  {problem}")
    for leftover in report.leftovers:
        print(f"note {leftover}: leftover of an interrupted write (not visible to readers)")
    bad = [f"{len(report.bad_shards)} bad shard(s): {', '.join(report.bad_shards)}"] if report.bad_shards else []
    if report.bad_store_files:
        bad.append(f"{len(report.bad_store_files)} bad file(s): {', '.join(report.bad_store_files)}")
    verdict = "clean" if report.ok else "; ".join(bad)
    print(f"{args.store}: {report.shards_checked} shard(s) checked, {verdict}")
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from kdstore.summary import summarize

    summary = summarize(args.store)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.to_markdown())
        print()
        print("spec:", json.dumps(summary.spec))
        print("provenance:", json.dumps(summary.provenance))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipeline.capture.shard_plan import plan_cache
    from pipeline.config import load_config

    config = load_config(args.config, overrides=parse_overrides(args.set))
    print(plan_cache(config).to_markdown())
    return 0


def _cache(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    config = load_config(args.config, overrides=parse_overrides(args.set))
    if args.no_flow:
        from pipeline.capture.teacher_pass import run_cache

        summary = run_cache(config, force=args.force)
    else:
        from flows.cache_teacher import cache_teacher

        summary = cache_teacher(config.model_dump(), force=args.force)
    print(json.dumps(summary, indent=2) if isinstance(summary, dict) else summary)
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.trainer import TrainConfig

    config = load_config(args.config, TrainConfig, overrides=parse_overrides(args.set))
    if args.no_flow:
        from pipeline.train.trainer import train

        result = train(config)
    else:
        from flows.train_student import train_student_flow

        result = train_student_flow(config.model_dump())
    print(json.dumps(result, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.evaluation.evaluate import EvalConfig

    config = load_config(args.config, EvalConfig, overrides=parse_overrides(args.set))
    if args.no_flow:
        from pipeline.evaluation.evaluate import evaluate
        from pipeline.evaluation.report import metrics_table, write_report

        result = evaluate(config)
        written = write_report(result, config.out, train_logs=config.train_logs)
        print(metrics_table(result))
        print(f"report: {written['markdown']}")
    else:
        from flows.evaluate import evaluate_flow
        from pipeline.evaluation.report import metrics_table

        done = evaluate_flow(config.model_dump())
        print(metrics_table(done["result"]))
        print(f"report: {done['report']['markdown']}")
    return 0


def _self_distill(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.self_distill import SelfDistillConfig

    config = load_config(args.config, SelfDistillConfig, overrides=parse_overrides(args.set))
    if args.no_flow:
        from pipeline.evaluation.self_distill_rounds import run_self_distill

        written = run_self_distill(config)
    else:
        from flows.self_distill import self_distill_flow

        written = self_distill_flow(config.model_dump())
        print(written["table"])
    print(f"rounds: {written['json']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.cache_teacher import serve_cache
    from pipeline.config import load_config

    config = load_config(args.config, overrides=parse_overrides(args.set))
    serve_cache(config.model_dump(), cron=args.cron, interval=args.interval, name=args.name)
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from pipeline.train.student_tokenizer import train_store_tokenizer

    tokenizer = train_store_tokenizer(args.store, args.vocab_size, args.out)
    print(f"{args.out}: byte-level BPE of {len(tokenizer):,} ids trained on the training documents of {args.store} "
          "(use it as student.tokenizer with a cross-tokenizer loss: xtok_align, dskd_cma)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.chat:
        from flows.chat_demo import chat_demo_flow

        chat_demo_flow(args.out or "runs/chat_demo", args.tokens, args.steps, args.eval_tokens, args.conversations)
        return 0
    from flows.demo import run_demo

    return run_demo(out_dir=args.out or "runs/demo", tokens=args.tokens, steps=args.steps, eval_tokens=args.eval_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache", description="Teacher once, students many times.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="re-hash every file of a store; exit 1 if anything is bad")
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument("--quick", action="store_true", help="check sizes only, do not re-hash")
    p.set_defaults(func=_verify)

    p = sub.add_parser("inspect", help="rows, tokens, bytes/token per field, spec, provenance")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    for name, func, helptext in (
        ("plan", _plan, "rows, tokens, shards and disk a cache config will take, before running it"),
        ("cache", _cache, "run the teacher once over the corpus into the store (Prefect flow)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
        if name == "cache":
            p.add_argument("--no-flow", action="store_true", help="run as a plain function, without Prefect")
            p.add_argument("--force", action="store_true",
                           help="start even when the store's disk has less free space than the plan's estimate")
        p.set_defaults(func=func)

    p = sub.add_parser("train", help="train a student from a store (Prefect flow; every file is checked as it is read)")
    p.add_argument("config", help="YAML train config (see configs/train_demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-flow", action="store_true", help="run as a plain function, without Prefect")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="teacher, students and a baseline on held-out rows: table, plots, report")
    p.add_argument("config", help="YAML eval config (see configs/eval_demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-flow", action="store_true", help="run as a plain function, without Prefect")
    p.set_defaults(func=_eval)

    p = sub.add_parser("self-distill", help="born-again rounds: each student is cached as the next one's teacher")
    p.add_argument("config", help="YAML self-distill config (see configs/self_distill_example.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-flow", action="store_true", help="run as a plain function, without Prefect")
    p.set_defaults(func=_self_distill)

    p = sub.add_parser("tokenizer", help="train a student tokenizer of its own on a store's corpus (cross-tokenizer KD)")
    p.add_argument("store", help="a store cached with signals.text: true")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="folder for the tokenizer files")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("serve", help="serve the cache flow on a schedule (new corpus files get cached)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 * * * *"')
    when.add_argument("--interval", type=float, help="seconds between runs")
    p.add_argument("--name", default="kdcache-cache", help="deployment name")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the main job on the embedded teacher and corpus")
    p.add_argument("--chat", action="store_true",
                   help="the chat demo: ShareGPT conversations, response-only losses, ROUGE-L of replies")
    p.add_argument("--conversations", type=int, default=None,
                   help="--chat: ShareGPT records to read (default: configs/chat_demo.yaml)")
    p.add_argument("--out", default=None, help="output folder (store and report; runs/demo or runs/chat_demo)")
    p.add_argument("--tokens", type=int, default=None, help="corpus tokens to cache (default 32,768)")
    p.add_argument("--steps", type=int, default=None, help="student training steps (default: configs/train_demo.yaml)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens to evaluate on (default: configs/eval_demo.yaml)")
    p.set_defaults(func=_demo)
    return parser


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a user error the CLI's own
    one-line message says it all (and --debug shows the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], USER_ERRORS))


PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        for name in PREFECT_RUN_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _HideUserErrorTracebacks) for f in logger.filters):
                logger.addFilter(_HideUserErrorTracebacks())
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"kdcache {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted (committed shards and checkpoints are kept)", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"kdcache {args.command}: internal error: {type(exc).__name__}: {error_line(exc)} "
              "(run with --debug for the traceback, and report it)", file=sys.stderr)
        return 1


def error_line(exc: BaseException) -> str:
    """The message without the noise some libraries add (a KeyError's quotes, trailing lines)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:3]) if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
