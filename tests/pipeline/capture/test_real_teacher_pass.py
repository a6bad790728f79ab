"""The real offline teacher (SmolLM2-135M-Instruct) on a small slice of the built-in corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdstore.reader import StoreReader
from kdstore.verify import verify_store
from pipeline.capture.pass_setup import teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config


@pytest.mark.slow
def test_real_teacher_store_matches_a_fresh_forward(tmp_path, default_teacher_dir):
    cfg = parse_config(
        {
            "store": str(tmp_path / "store"),
            "teacher": {"name": "default", "batch_size": 4},
            "corpus": {"kind": "builtin", "max_documents": 2},
            "row_length": 64,
            "shard_rows": 4,
            "split": "train",
            "max_tokens": 768,
            "signals": {"topk": {"k": 32}},
        },
        CacheConfig,
    )
    summary = run_cache(cfg, progress=None)
    assert summary["shards_computed"] == summary["shards"] >= 3
    assert verify_store(cfg.store).ok
    teacher = teacher_for(cfg)
    reader = StoreReader(cfg.store)
    rng = np.random.default_rng(0)
    for plan in [plans := plan_shards(cfg, teacher.tokenizer)][0][:: max(1, len(plans) // 2)]:
        ids = torch.from_numpy(plan.rows.input_ids.astype(np.int64))
        with torch.inference_mode():  # the same batches as the pass, so the same arithmetic
            logits = torch.cat([teacher.model(input_ids=ids[i : i + 4]).logits for i in range(0, len(ids), 4)])
        logp = torch.log_softmax(logits.double(), -1)
        ref_vals, ref_ids = logp.topk(32, -1)
        rows = rng.choice(len(ids), size=2, replace=False)
        got = reader.read_samples(plan.rows.sample_ids[rows].tolist(), ["topk_ids", "topk_logp", "topk_tail"])
        assert np.array_equal(got["topk_ids"], ref_ids[rows].numpy())
        assert np.abs(got["topk_logp"] - ref_vals[rows].numpy()).max() <= 1 / 32 + 1e-4  # step/2 + float32
        exact_tail = 1 - ref_vals[rows].exp().sum(-1).numpy()
        assert np.allclose(got["topk_tail"], exact_tail, atol=1e-5)  # float32 log-sum-exp over 49,152 logits
        assert np.allclose(got["topk_tail"], 1 - np.exp(ref_vals[rows].numpy()).sum(-1), atol=1e-5)  # float32 log-sum-exp over 49,152 logits
    assert 0.6 < summary["mean_kept_mass"] < 1.0
