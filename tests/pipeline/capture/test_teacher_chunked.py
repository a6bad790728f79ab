"""The teacher pass's chunked head (base model + head per chunk of tokens) against the whole-logits
path: same stored top-k ids, log-probs, tails, draws, hidden states and attention maps.

Tolerance: ids and draws equal; log-probs and tails within 1e-6 (the head's matmul over a chunk
of rows may round differently from the one over the whole batch on some backends; on this CPU
they are equal). Both a near-uniform tiny teacher (large tails) and a peaked one (initializer
range 1.0, top-k at temperature 0.1: some tails below extract.SMALL_TAIL, the dropped-id sum) are checked, with chunks of 16
tokens so a batch of 3 × 32 spans several chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.capture import extract
from pipeline.capture.pass_setup import open_writer, teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.capture.teacher_pass import compute_shard
from pipeline.config import CacheConfig, parse_config


def _config(store, teacher, top_p, temperature):
    topk = {"k": 8, "temperature": temperature, **({"sampler": "topp_k", "top_p": 0.5} if top_p else {})}
    return parse_config({
        "store": str(store), "teacher": {"name": str(teacher), "batch_size": 3},
        "corpus": {"kind": "builtin", "max_documents": 2}, "row_length": 32, "shard_rows": 4, "split": "train",
        "signals": {"topk": topk, "sampled": {"n_draws": 6}, "hidden": {"layers": [1]},
                    "attention": {"layers": [0], "heads": [0, 2]}},
    }, CacheConfig)


@pytest.mark.parametrize("peaked,top_p", [(False, False), (True, False), (True, True)])
def test_chunked_head_stores_what_whole_logits_store(tmp_path, tiny_teacher_dir, make_tiny_teacher,
                                                     smollm2_tokenizer, monkeypatch, peaked, top_p):
    teacher_dir = make_tiny_teacher(tmp_path / "peaked", smollm2_tokenizer, initializer_range=1.0) if peaked else tiny_teacher_dir
    cfg = _config(tmp_path / "store", teacher_dir, top_p, 0.1 if peaked else 1.0)
    teacher = teacher_for(cfg)
    spec = open_writer(cfg, teacher).meta.spec
    plan = plan_shards(cfg, teacher.tokenizer)[0]
    monkeypatch.setattr(extract, "TOKEN_CHUNK", 16)
    whole_calls = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: whole_calls.append(out.shape[:-1].numel()))
    try:
        whole = compute_shard(teacher, spec, plan, 3, chunked=False)
        calls_whole = len(whole_calls)
        chunked = compute_shard(teacher, spec, plan, 3, chunked=True)
    finally:
        hook.remove()
    assert calls_whole > 0
    assert all(n <= 8 for n in whole_calls[calls_whole:])  # chunked: the head layer ran on no batch (8: the check)
    tail = whole["topk_tail"]
    if peaked:
        assert (tail < extract.SMALL_TAIL).any()  # the dropped-id sum ran
    if top_p:
        assert (~np.isfinite(whole["topk_logp"])).any()
    assert whole.keys() == chunked.keys()
    for key, want in whole.items():
        got = chunked[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if key in ("topk_logp", "topk_tail"):
            assert np.array_equal(np.isfinite(got), np.isfinite(want)), key
            fin = np.isfinite(want)
            np.testing.assert_allclose(got[fin], want[fin], atol=1e-6, rtol=0, err_msg=key)
        else:
            assert np.array_equal(got, want), key
