"""The store's teacher/ folder: written once by the teacher pass, read by students and evaluation.

It holds the tokenizer files, the model config and the tensors some losses need in place of a
resident teacher (its output head; its input embeddings when untied), as safetensors.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kdstore.reader import StoreReader
from kdstore.records import TEACHER_DIR
from kdstore.writer import StoreWriter
from pipeline.capture.pass_setup import Teacher


def write_teacher_files(writer: StoreWriter, teacher: Teacher) -> None:
    """teacher/: tokenizer files, model config, output head and input embeddings (float16).

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
    writer.write_teacher_file("teacher.json", json.dumps(info, indent=2).encode())
    writer.commit_teacher()


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
