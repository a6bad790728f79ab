"""The online teacher's fields stay on the teacher's device: no device → numpy → device round trip,
and the same values the teacher pass stores for the same rows."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.capture import extract
from pipeline.capture.pass_setup import open_writer, teacher_for
from pipeline.capture.shard_plan import plan_shards
from pipeline.capture.teacher_pass import compute_shard
from pipeline.config import CacheConfig, parse_config
from pipeline.train.losses.output import TEACHER_LOGP
from pipeline.train.online_teacher import online_teacher_fields


def test_online_fields_stay_on_device_and_match_the_pass(tmp_path, tiny_teacher_dir, monkeypatch):
    cfg = parse_config({"store": str(tmp_path / "s"), "teacher": {"name": str(tiny_teacher_dir), "batch_size": 2},
                        "corpus": {"kind": "builtin", "max_documents": 2}, "row_length": 32, "shard_rows": 2,
                        "split": "train", "signals": {"topk": {"k": 8}, "hidden": {"layers": [1]}}}, CacheConfig)
    teacher = teacher_for(cfg)
    spec = open_writer(cfg, teacher).meta.spec
    plan = plan_shards(cfg, teacher.tokenizer)[0]
    stored = compute_shard(teacher, spec, plan, batch_size=2)

    def no_host_copy(tensor):
        raise AssertionError("the online teacher moved a field to the host")

    monkeypatch.setattr(extract, "to_numpy", no_host_copy)
    ids = torch.from_numpy(plan.rows.input_ids.astype(np.int64))
    fields = online_teacher_fields(teacher, spec, ids, full_logits=False)
    assert set(fields) == {"topk_ids", "topk_logp", "topk_tail", "hidden_1"}
    for name, value in fields.items():
        assert value.device == teacher.device and not value.is_inference() and not value.requires_grad
        np.testing.assert_allclose(value.numpy(), stored[name], rtol=1e-5, atol=1e-6, err_msg=name)
    full = online_teacher_fields(teacher, spec, ids, full_logits=True)[TEACHER_LOGP]
    assert not full.is_inference() and torch.allclose(full.exp().sum(-1), torch.ones(full.shape[:-1]), atol=1e-4)
