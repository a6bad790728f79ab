"""Evaluation of a chat store: perplexity over the held-out assistant tokens (against a dense
reference), and replies (greedy, or sampled per seed) to held-out prompts scored against the
references and the teacher's replies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore.reader import StoreReader
from pipeline.capture.chat import split_key
from pipeline.capture.packing import is_validation
from pipeline.capture.teacher_files import store_tokenizer
from pipeline.config import parse_config
from pipeline.evaluation.chat_eval import heldout_prompts
from pipeline.evaluation.evaluate import TEACHER, EvalConfig, evaluate, heldout_rows, predicted_mask
from tests.chat_docs import cache_chat, write_chat_corpus


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("chat_eval")
    return cache_chat(root / "store", tiny_teacher_dir, write_chat_corpus(root))


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, smollm2_tokenizer, make_tiny_teacher) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("chat_other_student"), smollm2_tokenizer, seed=5)


def test_assistant_token_perplexity_and_replies(chat_store, tiny_teacher_dir, other_student, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_config({"store": str(chat_store), "out": str(tmp_path), "teacher": str(tiny_teacher_dir),
                        "models": {"other": str(other_student), "same": str(tiny_teacher_dir)}, "max_tokens": 384,
                        "batch_size": 2, "device": "cpu",
                        "generation": {"prompts": 3, "prompt_tokens": 64, "new_tokens": 6}}, EvalConfig)
    result = evaluate(cfg, progress=None)
    reader = StoreReader(str(chat_store))
    tokenizer = store_tokenizer(reader)
    rows = heldout_rows(reader, tokenizer, cfg.max_tokens)
    assert rows.loss_mask is not None and 0 < rows.loss_mask.sum() < rows.valid.sum()
    ids = torch.from_numpy(rows.input_ids)
    mask = predicted_mask(torch.from_numpy(rows.doc_ids), torch.from_numpy(rows.valid))
    mask &= torch.from_numpy(rows.loss_mask[:, 1:])
    model = AutoModelForCausalLM.from_pretrained(other_student, dtype=torch.float64).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)[mask]
    nll = -lp.gather(-1, ids[:, 1:][mask][:, None]).mean().item()
    other = result["models"]["other"]
    assert other["ppl"] == pytest.approx(np.exp(nll), rel=1e-4) and other["tokens"] == int(mask.sum())
    assert result["chat"] and result["heldout_tokens"] == int(rows.loss_mask.sum())
    # replies: the teacher's copy agrees with the teacher; both scored against the references
    assert [s["same"] for s in result["samples"]] == [s[TEACHER] for s in result["samples"]]
    assert "vs_teacher" in result["models"]["same"]["generation"]
    assert {"vs_reference", "vs_teacher"} <= set(other["generation"]) and "rougeL" in other["generation"]["vs_reference"]
    prompts = heldout_prompts(reader, tokenizer, 3, 64)
    assert [s["reference"] for s in result["samples"]] == [p.reference for p in prompts] and len(prompts) == 3
    assert all(tokenizer.decode(p.ids).endswith("<|im_start|>assistant\n") for p in prompts)
    corpus = [json.loads(line)["messages"] for line in Path(reader.meta.provenance.corpus["paths"][0]).open()]
    held = [c for c in corpus if is_validation(split_key(c), 0.25)]
    assert [p.reference for p in prompts] == [c[-1]["content"] for c in held][:3]


def test_sampled_replies_are_seeded_paired_and_averaged(chat_store, tiny_teacher_dir, other_student):
    """Seeds: the same seeds give the same replies; a copy of the teacher samples the teacher's
    replies (the same seed before every model); the scores are the per-seed scores' mean."""
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation.chat_eval import chat_generation_metrics
    from pipeline.evaluation.metrics import score_texts

    reader = StoreReader(str(chat_store))
    tokenizer = store_tokenizer(reader)
    prompts = heldout_prompts(reader, tokenizer, 3, 64)
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval()
              for name, path in ((TEACHER, tiny_teacher_dir), ("same", tiny_teacher_dir), ("other", other_student))}

    def replies(seeds):
        return chat_generation_metrics(models, tokenizer, prompts, 8, torch.device("cpu"), TEACHER, seeds)

    scores, samples = replies([10, 20])
    again, samples_again = replies([10, 20])
    assert samples == samples_again and scores == again
    assert [s["same"] for s in samples] == [s[TEACHER] for s in samples]
    greedy = replies([])[1]
    assert any(s["other"] != g["other"] for s, g in zip(samples, greedy, strict=True))
    per_seed = [replies([seed])[1] for seed in (10, 20)]
    references = [p.reference for p in prompts]
    expected = [score_texts([s["other"] for s in run], references)["rougeL"] for run in per_seed]
    assert scores["other"]["vs_reference"]["rougeL"] == pytest.approx(sum(expected) / 2, abs=1e-9)
    assert per_seed[0] == samples  # the samples shown are the first seed's
