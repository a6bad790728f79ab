"""A corpus of 40 short documents (split train, val_fraction 0.3: about 12 held out) and the tiny
stores cached from it, shared by the evaluation, cross-tokenizer and self-distillation tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config

WORDS = ("the cat sat on a mat while python code ran fast and students learned from "
         "teachers quietly near old stone bridges under grey skies").split()


def write_short_docs(folder: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) + "." for _ in range(40)]
    path = folder / "docs.txt"
    path.write_text("\n\n".join(docs))
    return path


def cache_section(teacher: Path | str, corpus: Path, split: str = "train", signals: dict | None = None) -> dict[str, Any]:
    """A cache config without its store: rows of 32 tokens in shards of 4, blank-line documents,
    top-8 unless `signals` says otherwise."""
    return {"teacher": {"name": str(teacher), "batch_size": 4},
            "corpus": {"kind": "files", "paths": [str(corpus)], "text_split": "blank_line", "val_fraction": 0.3},
            "row_length": 32, "shard_rows": 4, "split": split, "signals": signals or {"topk": {"k": 8}}}


def cache_short_docs(store: Path, teacher: Path, corpus: Path, split: str = "train", signals: dict | None = None) -> Path:
    run_cache(parse_config({"store": str(store), **cache_section(teacher, corpus, split, signals)}, CacheConfig),
              progress=None)
    return store
