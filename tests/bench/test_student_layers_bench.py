"""`bench/student_layers.py`: greedy layer removal keeps the first and last layers and, at each
step, drops the layer whose removal gives the lowest perplexity (checked against fresh models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from short_docs import cache_short_docs, write_short_docs

from bench import student_layers
from kdstore.reader import StoreReader


def _ppl_without(folder: Path, keep: list[int], ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_greedy_removal_drops_the_cheapest_layer_each_step(tmp_path, smollm2_tokenizer, make_tiny_teacher, capsys):
    teacher = make_tiny_teacher(tmp_path / "teacher4", smollm2_tokenizer, seed=3, num_hidden_layers=5)
    store = cache_short_docs(tmp_path / "store", teacher, write_short_docs(tmp_path))
    assert student_layers.main(["--store", str(store), "--teacher", str(teacher), "--keep", "3", "--rows", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reader = StoreReader(str(store))
    ids = torch.from_numpy(reader.read_shard(reader.shard_ids()[0], ["input_ids"])["input_ids"][:2].astype(np.int64))
    keep = list(range(5))
    for n_layers, ppl in result["curve"][1:]:
        candidates = {d: _ppl_without(teacher, [k for k in keep if k != d], ids) for d in keep[1:-1]}
        drop = min(candidates, key=candidates.get)
        keep.remove(drop)
        assert len(keep) == n_layers and ppl == round(candidates[drop], 2)
    assert result["keep"] == keep and keep[0] == 0 and keep[-1] == 4 and len(keep) == 3
