"""Held-out conversations of a chat store: prompts, reference responses, and scored replies.

The DSKD protocol for instruction data: each model answers held-out prompts (greedy, or sampled
once per seed and averaged: `pipeline.evaluation.decoding`), and its answers are scored with
ROUGE-L (and the other text metrics of `metrics.score_texts`) against the dataset's reference
response and against the teacher's answer. A prompt is a held-out conversation up to its last
assistant turn that fits the prompt budget, rendered with the store's chat template and its
generation prompt; the reference is that assistant turn's content. Held-out = the documents the
store's own split holds out (`packing.in_split` of `chat.split_key`: validation, test or both), so
no cached training row holds them. Perplexity over assistant tokens needs nothing here: the held-out rows carry their loss
mask (`evaluate.heldout_rows`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdstore.reader import StoreReader
from pipeline.capture.chat import (
    ChatRecordError,
    iter_records,
    parse_conversation,
    record_shape,
    render,
    split_key,
)
from pipeline.capture.corpus import list_corpus_files
from pipeline.capture.packing import in_split
from pipeline.capture.shard_plan import corpus_source
from pipeline.config import CacheConfig, CorpusConfig
from pipeline.evaluation.decoding import decode_runs, generate_options, scores_over_runs


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]  # the rendered prompt, ending with the template's generation prompt
    reference: str  # the held-out assistant response
    where: str  # file and record


def heldout_prompts(reader: StoreReader, tokenizer: Any, count: int, max_prompt_tokens: int,
                    max_reference_tokens: int | None = None, split: str = "held_out") -> list[ChatPrompt]:
    """Up to ``count`` prompts of held-out ``split`` (validation, test or held_out) of at most ``max_prompt_tokens`` tokens (and references of
    at most ``max_reference_tokens``), one per conversation, in corpus order."""
    prov = reader.meta.provenance
    corpus = CorpusConfig(**prov.corpus)
    config = CacheConfig(store=reader.location.url, corpus=corpus, row_length=int(prov.packing["row_length"]))
    chat, source = corpus.chat_options, corpus_source(config)
    limit = prov.packing.get("max_documents")
    out: list[ChatPrompt] = []
    for file in list_corpus_files(source):
        records = iter_records(file, source)
        shape = None if chat.shape == "auto" else chat.shape
        for where, record in itertools.islice(records, limit) if limit else records:
            try:
                shape = shape or record_shape(record, where)
                messages = parse_conversation(record, where, shape)
            except ChatRecordError:
                continue  # the store skipped or refused it too
            if not in_split(split_key(messages), split, corpus.val_fraction):
                continue
            prompt = _prompt(messages, tokenizer, chat.template, max_prompt_tokens, max_reference_tokens)
            if prompt is not None:
                out.append(ChatPrompt(*prompt, where))
            if len(out) >= count:
                return out
    return out


def _prompt(messages: list[dict[str, str]], tokenizer: Any, template: str | None, max_prompt: int,
            max_reference: int | None) -> tuple[list[int], str] | None:
    """The conversation up to its last assistant turn whose prompt (and reference) fit, rendered
    with the generation prompt, and that turn's content; None when no turn fits."""
    for i in reversed([i for i, m in enumerate(messages) if m["role"] == "assistant"]):
        reference = messages[i]["content"]
        if max_reference is not None and len(tokenizer(reference, add_special_tokens=False)["input_ids"]) > max_reference:
            continue
        try:
            text = render(messages[:i], tokenizer, template, generation_prompt=True)
        except Exception:  # the template refuses this prefix (e.g. it must start with a user turn)
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt:
            return ids, reference
    return None


@torch.inference_mode()
def chat_generation_metrics(models: dict[str, Any], tokenizer: Any, prompts: list[ChatPrompt], new_tokens: int,
                            device: torch.device, teacher: str, seeds: Sequence[int] = ()
                            ) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """Every model's replies to every prompt (stopping at the template's end of turn = the
    tokenizer's eos), greedy or once per seed, scored against the reference and, beside it, the
    teacher's reply of the same run; scores are averaged over the runs, samples are the first run's."""
    runs: list[dict[str, list[str]]] = []
    for seed in decode_runs(seeds):
        texts: dict[str, list[str]] = {}
        for name, model in models.items():
            options = generate_options(seed)
            replies = []
            for p in prompts:
                ids = torch.tensor([p.ids], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                     **options)
                replies.append(tokenizer.decode(out[0, len(p.ids):].cpu(), skip_special_tokens=True).strip())
            texts[name] = replies
        runs.append(texts)
    scores = scores_over_runs(runs, [p.reference for p in prompts], teacher)
    samples = [{"prompt": tokenizer.decode(p.ids, skip_special_tokens=False), "reference": p.reference,
                **{name: runs[0][name][i] for name in runs[0]}} for i, p in enumerate(prompts)]
    return scores, samples
