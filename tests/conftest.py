"""Shared test fixtures: the real SmolLM2 tokenizer, a tiny random Llama teacher using it, and
the converted default teacher (slow the first time on a machine, then cached).

Tests never reach the network: hub access is switched off before anything imports
huggingface_hub (its offline flag is read at import time). Under xdist, each worker (and what it
starts) computes on its share of the cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the cores shared out among xdist workers: two workers × two torch threads on two cores wait
    # on each other. Set before torch is imported, so the processes the tests start inherit it.
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_teacher_dir() -> Path:
    """The default teacher converted into the real user cache ($KDCACHE_CACHE or
    ~/.cache/kdcache): ~30 s once per machine, instant after. Mark its users slow."""
    from pipeline.capture.teacher import default_teacher_dir as convert

    return convert()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the SmolLM2 tokenizer files. Copied from the converted default
    teacher when this machine has it, else read from the GGUF (~7 s) without the weights."""
    from transformers import AutoTokenizer

    from pipeline.capture.teacher import DEFAULT_TEACHER, MARKER, cache_root, default_gguf_path

    converted = cache_root() / "teachers" / DEFAULT_TEACHER
    if (converted / MARKER).is_file():
        tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    else:
        gguf = default_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  local_files_only=True)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir: Path) -> Any:
    """The SmolLM2 tokenizer, shared: do not mutate it (load your own copy to add tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)


def make_tiny_llama(out: Path, tokenizer: Any, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random Llama (width 64, 2 layers, 4 heads, 2 KV heads, tied embeddings)
    with ``tokenizer`` into ``out``; ``overrides`` go to LlamaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    params: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**params)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_teacher() -> Any:
    """The function behind ``tiny_teacher_dir``: ``make_tiny_teacher(out, tokenizer, seed=0,
    **llama_config_overrides) -> out``, for tests that need a variant."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    """A tiny random Llama teacher (vocab 49,152, width 64, 2 layers) with the SmolLM2
    tokenizer, saved as an ordinary HF folder. Read-only for tests."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm2_tokenizer)
