"""A corpus of 48 short synthetic conversations (JSONL, messages shape; split train, val_fraction
0.25) and the tiny chat store cached from it, shared by the chat trainer and evaluation tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config

NAMES = ("two", "three", "four", "five", "six", "seven")


def write_chat_corpus(folder: Path, n: int = 48, seed: int = 3) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randrange(6), rng.randrange(6)
        turns = [{"role": "user", "content": f"What is {NAMES[a]} plus {NAMES[b]}?"},
                 {"role": "assistant", "content": f"{NAMES[a].title()} plus {NAMES[b]} is {a + b + 4}."}]
        if rng.random() < 0.5:
            turns += [{"role": "user", "content": "Thanks, and the other way round?"},
                      {"role": "assistant", "content": f"{NAMES[b].title()} plus {NAMES[a]} is the same."}]
        lines.append(json.dumps({"messages": turns}))
    path = folder / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_cache_config(store: Path, teacher: Path | str, corpus: Path, **chat) -> CacheConfig:
    return parse_config({"store": str(store), "teacher": {"name": str(teacher), "batch_size": 4},
                         "corpus": {"kind": "chat", "paths": [str(corpus)], "val_fraction": 0.25,
                                    **({"chat": chat} if chat else {})},
                         "row_length": 96, "shard_rows": 4, "split": "train", "signals": {"topk": {"k": 8}}},
                        CacheConfig)


def cache_chat(store: Path, teacher: Path | str, corpus: Path, **chat) -> Path:
    run_cache(chat_cache_config(store, teacher, corpus, **chat), progress=None)
    return store
