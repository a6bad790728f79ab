"""The evaluation report: one folder a person opens (README.md with the table, the plots and
sample continuations) and one JSON file a program reads, made from `pipeline.evaluation.evaluate` results.

Kept apart from the metrics so a flow can publish the same markdown as a Prefect artifact and a
benchmark can print the same table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation import plots

TOKEN_COLUMNS = (  # (header, key, format)
    ("ppl", "ppl", "{:.2f}"),
    ("bits/byte", "bits_per_byte", "{:.3f}"),
    ("KL to teacher", "kl_to_teacher", "{:.4f}"),
    ("top-1 agree", "top1_agreement", "{:.3f}"),
    ("ECE (pts)", "ece", "ece"),
    ("accuracy", "accuracy", "{:.3f}"),
)
GEN_COLUMNS = (("BLEU", "bleu", "{:.1f}"), ("chrF", "chrf", "{:.1f}"), ("TER", "ter", "{:.1f}"),
               ("ROUGE-L", "rougeL", "{:.1f}"), ("CER", "cer", "{:.3f}"))


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "ece":
        return f"{100 * value:.2f}"
    return fmt.format(value)


def metrics_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per model, token metrics then generation scores (vs the real text and vs
    the teacher's continuation); Δ ppl is relative to the baseline when there is one."""
    models = result["models"]
    baseline = result.get("baseline")
    base_ppl = models[baseline]["ppl"] if baseline in models else None
    head = ["model", *(h for h, _, _ in TOKEN_COLUMNS)]
    if base_ppl is not None:
        head.insert(2, f"Δ ppl vs {baseline}")
    any_gen = any("generation" in m for m in models.values())
    if any_gen:
        head += [f"{h} vs text" for h, _, _ in GEN_COLUMNS] + [f"{h} vs teacher" for h, _, _ in GEN_COLUMNS[:4]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, m in models.items():
        cells = [name, *(_fmt(m.get(key), fmt) for _, key, fmt in TOKEN_COLUMNS)]
        if base_ppl is not None:
            cells.insert(2, "–" if name == baseline else f"{100 * (m['ppl'] / base_ppl - 1):+.1f} %")
        if any_gen:
            gen = m.get("generation", {})
            ref, tea = gen.get("vs_reference", {}), gen.get("vs_teacher", {})
            cells += [_fmt(ref.get(key), fmt) for _, key, fmt in GEN_COLUMNS]
            cells += [_fmt(tea.get(key), fmt) for _, key, fmt in GEN_COLUMNS[:4]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _samples_markdown(samples: Sequence[Mapping[str, str]], limit: int = 3) -> str:
    out = []
    for i, s in enumerate(samples[:limit]):
        out.append(f"**Prompt {i + 1}.** `{_one_line(s['prompt'])}`\n")
        for key, text in s.items():
            if key != "prompt":
                out.append(f"- *{key}*: `{_one_line(text)}`")
        out.append("")
    return "\n".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("`", "'")


def write_report(result: Mapping[str, Any], out: str | Path, *, title: str = "kdcache evaluation",
                 train_logs: Mapping[str, str] | None = None,
                 bytes_by_k: Sequence[Mapping[str, float]] | None = None,
                 preamble: str = "") -> dict[str, Path]:
    """eval.json, README.md and the PNG plots under `out`; returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    written["json"] = out / "eval.json"
    table = {name: {"ppl": m["ppl"], "KL to teacher": m.get("kl_to_teacher", float("nan")),
                    "top-1 agreement": m.get("top1_agreement", float("nan")), "ECE (pts)": 100 * m["ece"]}
             for name, m in result["models"].items()}
    written["metrics"] = plots.plot_metrics(table, out / "metrics.png", list(next(iter(table.values()))),
                                            title=f"{result['heldout_tokens']:,} held-out tokens", log_scale=["ppl"])
    written["reliability"] = plots.plot_reliability(
        {name: m["calibration"] for name, m in result["models"].items()}, out / "reliability.png")
    logs = {name: path for name, path in (train_logs or {}).items() if Path(path).is_file()}
    if logs:
        written["curves"] = plots.plot_training_curves(logs, out / "training_curves.png")
    if bytes_by_k:
        written["bytes_vs_k"] = plots.plot_bytes_vs_k(
            [(int(p["k"]), float(p["bytes_per_token"]), float(p["kept_mass"])) for p in bytes_by_k],
            out / "bytes_vs_k.png")
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    split = result.get("split", "held_out").replace("_", "-")
    md += [f"Held-out: {result['heldout_tokens']:,} tokens ({result['heldout_rows']} rows of the store's {split} "
           "documents). Perplexity is per token inside documents; KL(teacher ‖ model) over the full vocabulary; "
           f"ECE of the top-1 prediction in percentage points; generation ({result.get('decoding') or 'greedy'}): "
           "continuations, "
           "BLEU/chrF/TER (sacrebleu), ROUGE-L (rouge-score), CER (jiwer).", ""]
    if result.get("chat"):
        md += ["Chat store: every per-token metric counts the assistant's tokens only (the store's loss mask); "
               "generation = replies to held-out conversation prompts (up to the last assistant turn), "
               "scored against the reference response and the teacher's reply.", ""]
    if result.get("own_tokenizer"):
        md += [f"Models with their own tokenizer ({', '.join(result['own_tokenizer'])}) are scored on the same documents "
               "packed with it: their perplexity is per their own tokens (compare bits/byte across tokenizers), and "
               "KL, agreement and generation need the teacher's vocabulary.", ""]
    md += [metrics_table(result), ""]
    images = [("metrics", "Metrics side by side"), ("reliability", "Calibration (reliability diagram)"),
              ("curves", "Training curves per loss component"), ("bytes_vs_k", "Store size vs k")]
    for key, caption in images:
        if key in written:
            md += [f"## {caption}", "", f"![{caption}]({written[key].name})", ""]
    if bytes_by_k:
        md += ["| k | bytes/token (top-k files) | mean kept mass |", "|---:|---:|---:|"]
        md += [f"| {int(p['k'])} | {p['bytes_per_token']:.1f} | {p['kept_mass']:.3f} |" for p in bytes_by_k]
        md.append("")
    if result.get("samples"):
        md += ["## Sample continuations", "", _samples_markdown(result["samples"])]
    (out / "README.md").write_text("\n".join(md))
    written["markdown"] = out / "README.md"
    return written
