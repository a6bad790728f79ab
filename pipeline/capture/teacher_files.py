"""The store's teacher/ folder: written once by the teacher pass, read by students and evaluation.

It holds the tokenizer files, the model config and the tensors some losses need in place of a
resident teacher (its output head; its input embeddings when untied), as safetensors; with hidden
states in the spec, also per-dimension statistics of each stored layer (`hidden_stats`: mean and
std over the valid tokens of a calibration sample, the first rows of the corpus), so that
alignment losses compare hidden states in a normalised space: a few outlier dimensions of the
teacher would otherwise own the squared error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.reader import StoreReader
from kdstore.records import TEACHER_DIR
from kdstore.writer import StoreWriter
from pipeline.capture.pass_setup import Teacher

CALIBRATION_ROWS = 16
HIDDEN_STATS = "hidden_stats"


def write_teacher_files(writer: StoreWriter, teacher: Teacher, calibration: Any = None, batch_size: int = 8) -> None:
    """teacher/: tokenizer files, model config, output head and input embeddings (float16), and
    with hidden states in the spec, `hidden_stats` from `calibration` (PackedRows; the first
    CALIBRATION_ROWS rows are run through the teacher).

    Written once per store; losses such as dual-space KD use the head instead of a resident
    teacher. Tied embeddings are stored once (`output_head`) and said so in teacher.json.
    A pass killed half-way rewrites the same bytes; teacher/COMMIT.json, which hashes every
    file, comes last and marks teacher/ complete.
    """
    if writer.teacher_committed():
        return
    with tempfile.TemporaryDirectory() as tmp:
        teacher.tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            writer.write_teacher_file(f"tokenizer/{path.name}", path.read_bytes())
    writer.write_teacher_file("config.json", teacher.model.config.to_json_string().encode())
    head = teacher.model.get_output_embeddings().weight.detach().float().cpu().numpy().astype("float16")
    writer.write_teacher_tensors("output_head", {"weight": head})
    if not teacher.facts["tied_embeddings"]:
        emb = teacher.model.get_input_embeddings().weight.detach().float().cpu().numpy().astype("float16")
        writer.write_teacher_tensors("input_embeddings", {"weight": emb})
    info = {**teacher.provenance, **teacher.facts}
    hidden = writer.meta.spec.hidden
    if hidden is not None and calibration is not None and len(calibration.sample_ids):
        stats, tokens = hidden_statistics(teacher, hidden.layers, calibration, batch_size)
        writer.write_teacher_tensors(HIDDEN_STATS, stats)
        info["hidden_stats"] = {"layers": list(hidden.layers), "tokens": tokens, "rows": min(CALIBRATION_ROWS, len(calibration.sample_ids))}
    writer.write_teacher_file("teacher.json", json.dumps(info, indent=2).encode())
    writer.commit_teacher()


def hidden_statistics(teacher: Teacher, layers: Any, rows: Any, batch_size: int = 8) -> tuple[dict[str, np.ndarray], int]:
    """Per stored layer L: mean_L and std_L [width] (float32) over the valid tokens of the first
    CALIBRATION_ROWS rows, accumulated in float64."""
    n = min(CALIBRATION_ROWS, len(rows.sample_ids))
    sums: dict[int, np.ndarray] = {}
    squares: dict[int, np.ndarray] = {}
    count = 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        ids = torch.from_numpy(rows.input_ids[start:stop].astype(np.int64)).to(teacher.device)
        valid = np.asarray(rows.valid[start:stop], bool)
        with torch.inference_mode():
            out = teacher.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        for layer in layers:
            h = out.hidden_states[layer].double().cpu().numpy()[valid]
            sums[layer] = sums.get(layer, 0.0) + h.sum(0)
            squares[layer] = squares.get(layer, 0.0) + (h * h).sum(0)
        count += int(valid.sum())
    stats = {}
    for layer in layers:
        mean = sums[layer] / max(count, 1)
        var = np.maximum(squares[layer] / max(count, 1) - mean * mean, 0.0)
        stats[f"mean_{layer}"] = mean.astype(np.float32)
        stats[f"std_{layer}"] = np.sqrt(var).astype(np.float32)
    return stats, count


def store_tokenizer(reader: StoreReader) -> Any:
    """The tokenizer saved under the store's teacher/ folder."""
    from transformers import AutoTokenizer

    loc = reader.location
    files = loc.walk_files(TEACHER_DIR, "tokenizer") if loc.exists(TEACHER_DIR, "tokenizer") else {}
    if not files:
        raise FileNotFoundError(f"store {loc.url!r} has no {TEACHER_DIR}/tokenizer/ (written by the teacher pass)")
    with tempfile.TemporaryDirectory() as tmp:
        for rel in files:
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(loc.read_bytes(TEACHER_DIR, "tokenizer", rel))
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
