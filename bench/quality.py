"""Quality in a regime that means something: students trained several epochs over the whole cache.

    .venv/bin/python -m bench.quality [--quick] [--methods ce,topk64,...] [--epochs 3]
                                      [--device cuda] [--out runs/quality] [--variant NAME:BASE:JSON]

Every method trains the same student (a cut of the offline teacher: its embeddings, head and the
preset's layers) from the same initialisation, on the same batches (same seed, same store rows in
the same order), for the same steps: `epochs` passes over the whole cached training split of the
built-in corpus (~107k tokens; the stores are built once and reused across runs, see
`bench_stores`). Perplexity is measured at step 0 and at `eval_points` evenly spaced steps
(`Trainer.train`'s `on_step` hook), drawn as learning curves in one PNG, and the final models get
the full evaluation (ECE, KL to the teacher, top-1 agreement, bits/byte).

Splits (`pipeline.capture.packing`): the stores cache the train split; the held-out text is
halved by content into validation and test. Sweep points (`--variant`, `--draws-sweep`, `--store-sweep`,
`--fakd-sweep`) are trained and scored on validation only (`train_sweeps`); every method also
gets a final validation score, which is what a choice of weight or recipe reads. The table, the
curves and the targets of the other methods are test figures; the JSON's `splits` names the
split of each key.

Methods (`bench/quality_methods.py`): ce, topk64 (label_tail 0.5), sample12 (label_tail 0.25), hybrid
(topk_tail_sample: top-16 + 8 tail draws), sample4, hybrid4x8, online_full (the reference: forward KL against the resident teacher's full
distribution), feature_align (fakd, hidden states in the standardised space), dskd (the authors'
recipe), ce_foreign_tokenizer / cross_tokenizer_baseline / cross_tokenizer_cma (a student with
its own 8,192-id tokenizer), multi_teacher, self_distill_round2 (born-again from the topk64
student), adversarial. `--variant NAME:BASE:JSON` (repeatable) adds a run of BASE with JSON merged
into its first loss's config (a JSON list: BASE's losses replaced): a sweep point.
`--fakd-sweep h:a,...` adds feature_align variants with those hidden / attention weights.
`--store-sweep NAME:BASE:JSON` adds a run of BASE's losses on its own store (JSON: its signals and zstd_level).

Presets: `cpu` (default; the 6 layers greedy pruning keeps, 2 epochs, bf16 autocast on this AMX
CPU), `--quick` (8,192 cached tokens, 2 epochs, ce, topk64, hybrid: ≤ 10 min here), `--device
cuda` (12 pruned layers, 8 epochs, up to 16k tokens per split). Converged means the CE student's
test perplexity improved by < 2 % over the last quarter of its run (`ce_last_quarter_improvement`),
or rose (overfitting, reported).

Prints the tables and, as its last line, one JSON object (`bench.quality_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_stores import cached_store  # noqa: E402
from bench.common import bench_trainer, log  # noqa: E402
from bench.quality_methods import (  # noqa: E402
    COUNTERPART,
    PRESETS,
    STORE_FIELDS,
    STUDENT_VOCAB,
    Preset,
    feature_align,
    methods,
    signal_files,
    store_configs,
    with_dependencies,
)
from bench.quality_report import REPORT_SPLIT, ROW, SWEEP_SPLIT, report  # noqa: E402
from kdstore.reader import StoreReader  # noqa: E402
from kdstore.spec import DRAW_SCHEMES  # noqa: E402
from pipeline.config import CacheConfig, ConfigError, parse_config  # noqa: E402
from pipeline.evaluation.evaluate import (  # noqa: E402
    EvalConfig,
    evaluate,
    heldout_rows,
    token_bytes,
    token_metrics,
)
from pipeline.train.checkpoint import CHECKPOINT  # noqa: E402
from pipeline.train.losses import LossConfigError, parse_loss_config  # noqa: E402
from pipeline.train.train_log import LOG_JSONL  # noqa: E402


def eval_steps(steps: int, points: int) -> list[int]:
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


class SplitScorer:
    """Perplexity of an in-memory model on one held-out split of the store's corpus, validation or
    test (`pipeline.capture.packing.split_text`), rows packed once per tokenizer. `docs` collects
    the indices (in their corpus file) of the documents it has scored; `initial` holds the
    perplexity at initialisation per tokenizer kind (every method starts from the same one)."""

    def __init__(self, store: str, split: str, max_tokens: int, device: torch.device):
        if split not in (SWEEP_SPLIT, REPORT_SPLIT):
            raise ValueError(f"scoring split {split!r}: expected {SWEEP_SPLIT!r} or {REPORT_SPLIT!r}")
        self.reader = StoreReader(store)
        self.split = split
        self.max_tokens = max_tokens
        self.device = device
        self.rows: dict[str, Any] = {}
        self.docs: set[int] = set()
        self.initial: dict[str, float] = {}

    def __call__(self, model: Any, tokenizer: Any) -> float:
        key = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        if key not in self.rows:
            rows = heldout_rows(self.reader, tokenizer, self.max_tokens, self.split)
            self.docs |= set(rows.doc_ids[rows.valid].tolist())
            self.rows[key] = (rows, token_bytes(tokenizer))
        rows, label_bytes = self.rows[key]
        was_training = model.training
        model.eval()
        metrics = token_metrics({"m": model}, rows, 4, 15, self.device, label_bytes)["m"]
        model.train(was_training)
        return float(metrics["ppl"])


@dataclass
class Run:
    """What every method of one benchmark run shares. `stores` gains the stores cached with this
    run's students as teachers (self-distillation, the second teacher) as they are built."""

    table: dict[str, Any]
    stores: dict[str, str]
    configs: dict[str, dict[str, Any]]
    root: Path
    preset: Preset
    args: argparse.Namespace
    steps: int
    tokenizer: Path | None = None  # the own-tokenizer students' tokenizer


def train_method(name: str, run: Run, scorer: SplitScorer) -> dict[str, Any]:
    """Train one method with `Trainer.train`, scoring its perplexity on `scorer`'s split at step 0
    and at the preset's evaluation points (the `on_step` hook)."""
    spec, preset, args = run.table[name], run.preset, run.args
    out = run.root / name
    shutil.rmtree(out, ignore_errors=True)
    store, extra = run.stores[spec["store"]], []
    if spec.get("teacher_from"):
        store = run.stores[name] = student_store(run.configs["full"], run.root / spec["teacher_from"])
    if spec.get("second_teacher"):
        extra = [student_store(run.configs["full"], run.root / spec["second_teacher"])]
    log(f"--- {name} (scored on {scorer.split}): {json.dumps(spec['losses'])}")
    method = {k: v for k, v in spec.items() if k in ("losses", "online_teacher", "online_full_logits")}
    student: dict[str, Any] = {"init": "teacher_layers", "teacher": args.teacher, "layers": list(preset.student_layers)}
    if spec.get("own_tokenizer"):
        student["tokenizer"] = str(run.tokenizer)
    started, cpu0 = time.perf_counter(), time.process_time()
    trainer = bench_trainer(store=store, out=str(out), student=student, extra_stores=extra,
                            batch_size=preset.batch_size, steps=run.steps, lr=preset.lr,
                            warmup_steps=max(1, run.steps // 20), seed=args.seed, device=args.device,
                            bf16=False if args.fp32 else "auto", **method)
    tok = trainer.student.tokenizer
    kind = "foreign" if spec.get("own_tokenizer") else "store"
    if kind not in scorer.initial:
        scorer.initial[kind] = scorer(trainer.student.model, tok)
    curve = [[0, scorer.initial[kind]]]
    points = set(eval_steps(run.steps, preset.eval_points))

    def on_step(trainer: Any, record: dict[str, Any]) -> None:
        if trainer.step in points:
            curve.append([sum(map(len, sample_ids(out))) * ROW, scorer(trainer.student.model, tok)])
            log(f"    {name} step {trainer.step}/{run.steps}: {scorer.split} ppl {curve[-1][1]:.2f} "
                f"({time.perf_counter() - started:.0f} s)")

    result = trainer.train(progress=False, on_step=on_step)
    (out / CHECKPOINT).unlink(missing_ok=True)  # the model/ folder is what later steps read
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    log(f"    {name}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "curve": curve, "sample_ids": sample_ids(out),
            "last": {k: v for k, v in result["last"].items() if isinstance(v, float)}, "split": scorer.split}


def train_sweeps(names: list[str], run: Run, scorer: SplitScorer) -> dict[str, dict[str, Any]]:
    """The sweep points (`--variant`, `--draws-sweep`, `--store-sweep`, `--fakd-sweep`), trained and scored on the
    validation split only: a weight or recipe chosen from them has not seen the test split."""
    if scorer.split != SWEEP_SPLIT:
        raise ValueError(f"sweep points are scored on the {SWEEP_SPLIT} split only, not {scorer.split!r}")
    return {name: train_method(name, run, scorer) for name in names}


def sample_ids(out: Path) -> list[list[int]]:
    """The rows of every step so far, from the run's train log."""
    path = out / LOG_JSONL
    return [json.loads(line)["sample_ids"] for line in path.read_text().splitlines()] if path.exists() else []


def student_store(config: dict[str, Any], student_run: Path) -> str:
    """The `full` store's rows cached with a trained student of this run as the teacher (top-64)."""
    data = {**config, "teacher": {"name": str(student_run), "batch_size": 8}, "signals": {"topk": {"k": 64}}}
    weights = hashlib.sha256((student_run / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    return cached_store(f"quality-student-{student_run.name}-{weights}", data)


def split_name_base_json(text: str, flag: str) -> tuple[str, str, Any]:
    """NAME:BASE:JSON → (name, base, the parsed JSON); JSON that does not parse exits with one line."""
    name, _, rest = text.partition(":")
    base, _, params = rest.partition(":")
    try:
        return name, base, json.loads(params)
    except json.JSONDecodeError as exc:
        sys.exit(f"{flag} {text!r}: JSON after NAME:BASE: does not parse ({exc.msg})")


def parse_variant(text: str, table: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """NAME:BASE:JSON → (name, base method, its losses): a JSON object is merged into BASE's first
    loss, a JSON list replaces BASE's losses; a bad one exits with one line."""
    name, base, loaded = split_name_base_json(text, "--variant")
    if not name or name in table or base not in table or not isinstance(loaded, dict | list) or not loaded:
        sys.exit(f"--variant {text!r}: want NEW_NAME:BASE:{{...}} or NEW_NAME:BASE:[losses] with BASE one of "
                 f"{', '.join(table)}")
    base_losses = table[base]["losses"]
    losses = loaded if isinstance(loaded, list) else [{**base_losses[0], **loaded}, *base_losses[1:]]
    try:  # refused here, before any method trains, not when its turn comes
        parse_loss_config(losses, f"--variant {name}")
    except LossConfigError as exc:
        sys.exit(str(exc))
    return name, base, losses


STORE_SWEEP_KEYS = {"signals", "zstd_level"}  # what a store sweep may change: not rows, shards or batches


def draws_method(pair: str, table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`N:SCHEME` → method sample{N}_{SCHEME} (plain sampled_kd) and its store's sampled signal."""
    n, _, scheme = pair.partition(":")
    if not n.isdigit() or not 1 <= int(n) <= 255 or scheme not in DRAW_SCHEMES:
        sys.exit(f"--draws-sweep {pair!r}: want N:SCHEME with N in [1, 255] and SCHEME one of {DRAW_SCHEMES}")
    name = f"sample{int(n)}_{scheme}"
    table[name] = {"store": name, "losses": [{"name": "sampled_kd"}]}
    STORE_FIELDS[name] = STORE_FIELDS["sample12"]
    return name, {"signals": {"sampled": {"n_draws": int(n), "scheme": scheme}}}


def store_method(text: str, table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`NAME:BASE:JSON` → method NAME, BASE's losses on its own store: the `full` store's cache
    config with JSON's keys (`signals`, and `zstd_level`, which leaves the rows as they are)
    replacing its own; a bad one exits with one line."""
    name, base, overlay = split_name_base_json(text, "--store-sweep")
    if not name or name in table or base not in table or not isinstance(overlay, dict) or "signals" not in overlay:
        sys.exit(f"--store-sweep {text!r}: want NEW_NAME:BASE:{{\"signals\": {{...}}}} with BASE one of {', '.join(table)}")
    if set(overlay) - STORE_SWEEP_KEYS:
        sys.exit(f"--store-sweep {name}: keys {sorted(set(overlay) - STORE_SWEEP_KEYS)} would change the rows or "
                 f"batches; only {sorted(STORE_SWEEP_KEYS)} are swept")
    try:  # refused here, before any store is built
        parse_config({"teacher": {"name": "default"}, "store": "-", **overlay}, CacheConfig)
    except ConfigError as exc:
        sys.exit(f"--store-sweep {name}: {exc}")
    table[name] = {**table[base], "store": name}
    STORE_FIELDS[name] = signal_files(overlay["signals"])
    return name, overlay


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Held-out quality of students trained several epochs from the cache.")
    p.add_argument("--quick", action="store_true", help="8,192 cached tokens, 2 epochs, ce,topk64,hybrid (≤ 10 min)")
    p.add_argument("--methods", help="comma-separated (default: the preset's, all for cpu/cuda)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-points", type=int)
    p.add_argument("--fakd-sweep", default="", help="hidden:attention weights of extra feature_align runs, e.g. 0.5:0.1,1:0.5")
    p.add_argument("--draws-sweep", default="", metavar="N:SCHEME,...",
                   help="extra sampled_kd runs, each from its own store of N draws per token taken by SCHEME "
                        "(multinomial or systematic), e.g. 12:multinomial,48:systematic")
    p.add_argument("--store-sweep", action="append", default=[], metavar="NAME:BASE:JSON",
                   help='a run of method BASE\'s losses on its own store: JSON\'s signals (and zstd_level) replace the full '
                        'store\'s, e.g. s6:sample12:{"signals":{"topk":null,"sampled":{"n_draws":6,"scheme":"systematic"}}} '
                        '(repeatable: a sweep)')
    p.add_argument("--variant", action="append", default=[], metavar="NAME:BASE:JSON",
                   help='another run of method BASE with JSON merged into its first loss, e.g. '
                        'cma_warm:cross_tokenizer_cma:{"projector_warmup_steps":52}, or a JSON list of losses '
                        'replacing its own (repeatable: a sweep)')
    p.add_argument("--teacher", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="student steps in float32 (default: bfloat16 autocast on CUDA and AMX CPUs)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="keep students, curves and the PNG here (default: a temporary folder)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    preset = PRESETS["quick" if args.quick else "cuda" if cuda else "cpu"]
    preset = dataclasses.replace(preset, epochs=args.epochs or preset.epochs, eval_points=args.eval_points or preset.eval_points)
    torch.set_num_threads(args.threads)
    table = methods(preset)
    sweeps: list[str] = []
    for pair in filter(None, args.fakd_sweep.split(",")):
        h, a = (float(x) for x in pair.split(":"))
        table[f"feature_align_h{h:g}_a{a:g}"] = {"store": "full", "losses": [feature_align(preset, h, a)]}
        STORE_FIELDS[f"feature_align_h{h:g}_a{a:g}"] = STORE_FIELDS["feature_align"]
        sweeps.append(f"feature_align_h{h:g}_a{a:g}")
    sweep_stores: dict[str, dict[str, Any]] = {}
    for pair in filter(None, args.draws_sweep.split(",")):
        name, store = draws_method(pair, table)
        sweep_stores[name] = store
        sweeps.append(name)
    for text in args.store_sweep:
        name, overlay = store_method(text, table)
        sweep_stores[name] = overlay
        sweeps.append(name)
    for text in args.variant:
        name, base, losses = parse_variant(text, table)
        table[name] = {**table[base], "losses": losses}
        STORE_FIELDS[name] = STORE_FIELDS[base]
        sweeps.append(name)
        if base in COUNTERPART:
            COUNTERPART[name] = COUNTERPART[base]
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else list(preset.methods or table)
    chosen += [m for m in sweeps if m not in chosen]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(table)}")
    chosen = with_dependencies(chosen, table)
    reported = [m for m in chosen if m not in sweeps]  # sweep points never reach the test split
    started = time.perf_counter()
    configs = store_configs(preset, args.teacher, sweep_stores)
    stores = {key: cached_store(f"quality-{preset.name}-{key}", configs[key])
              for key in sorted({table[m]["store"] for m in chosen} | {"full"})}
    full = StoreReader(stores["full"])
    rows = sum(full.read_shard(s, ["sample_id"])["sample_id"].size for s in full.shard_ids())
    steps = max(1, math.ceil(rows * preset.epochs / preset.batch_size))
    log(f"preset {preset.name}: {rows} rows × {ROW} = {rows * ROW:,} cached tokens, {preset.epochs} epochs = {steps} "
        f"steps of {preset.batch_size} rows; student = teacher layers {list(preset.student_layers)}; "
        f"{len(reported)} methods scored on {REPORT_SPLIT}, {len(sweeps)} sweep points on {SWEEP_SPLIT}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdcache-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    run = Run(table, stores, configs, root, preset, args, steps)
    if any(table[m].get("own_tokenizer") for m in chosen):
        from pipeline.train.student_tokenizer import train_store_tokenizer

        run.tokenizer = root / "student_tokenizer"
        train_store_tokenizer(stores["full"], STUDENT_VOCAB, run.tokenizer)
    device = torch.device("cuda" if cuda else "cpu")
    test_scorer = SplitScorer(stores["full"], REPORT_SPLIT, preset.eval_tokens, device)
    trained = {m: train_method(m, run, test_scorer) for m in reported}
    trained |= train_sweeps(sweeps, run, SplitScorer(stores["full"], SWEEP_SPLIT, preset.eval_tokens, device))
    same_batches = all(t["sample_ids"] == trained[chosen[0]]["sample_ids"] for t in trained.values())
    finals = {}
    for split, names in ((REPORT_SPLIT, reported), (SWEEP_SPLIT, chosen)):
        if names:
            finals[split] = evaluate(EvalConfig(
                store=stores["full"], out=str(root / f"eval_{split}"), models={m: str(root / m / "model") for m in names},
                baseline="ce" if "ce" in names else None, teacher=args.teacher, max_tokens=preset.eval_tokens,
                split=split, generation=None, device=args.device), progress=log)
    print(json.dumps(report(run, reported, sweeps, trained, finals, rows, same_batches, started)))


if __name__ == "__main__":
    main()
