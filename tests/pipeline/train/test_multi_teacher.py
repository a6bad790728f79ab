"""Multi-teacher distillation end to end: two tiny teachers (same tokenizer, different random
weights, peaked by initializer_range=0.5) cached over the same corpus, joined by sample id.

Teacher 1 is teacher 0 plus seed-1 noise, not an independent seed-1 model: two independent
random models have disjoint top-8 sets over 49,152 ids at every position, so the exact mixture
(explicit buckets = ids kept by every teacher) has one bucket and is 0 everywhere. With noise
of 0.05 weight-std, ~3 of teacher 1's top-6 ids are in teacher 0's top-8.

Store A (teacher 0): top-8, 4 rows per shard. Store B (teacher 1, seed 1): top-6, 3 rows per
shard, so the two stores' shards do not line up and the join really goes by sample id.
Rows of 32 tokens; ~10 rows per store.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from kdstore.errors import MissingFieldError, StoreMismatchError
from kdstore.join import StoreJoin, check_aligned, joined_field_names
from kdstore.reader import StoreReader
from kdstore.spec import StoreSpec, TopKSpec
from kdstore.torch_stream import KDLoader, KDStream
from kdstore.writer import StoreWriter
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, ConfigError, parse_config
from pipeline.train.losses import LossConfigError
from pipeline.train.trainer import TrainConfig, Trainer, train

WORDS = ("the cat sat on a mat while python code ran fast and students learned from "
         "teachers quietly near old stone bridges under grey skies").split()
FIELDS = ["topk_ids", "topk_logp", "topk_tail", "valid", "t1/topk_ids", "t1/topk_logp", "t1/topk_tail"]


def _corpus(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(2):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)) + ".")
    return folder


def _perturbed(src: Path, out: Path, tokenizer, seed: int = 1, scale: float = 0.05) -> Path:
    """Another teacher close to `src`: every weight plus scale·std·N(0, 1) noise (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * param.std() * torch.randn(param.shape, generator=g))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cache(store: Path, teacher: Path, corpus: Path, k: int, **over) -> Path:
    data = {"store": str(store), "teacher": {"name": str(teacher), "batch_size": 4},
            "corpus": {"kind": "files", "paths": [str(corpus)]}, "row_length": 32, "shard_rows": 4,
            "split": "all", "signals": {"topk": {"k": k}}}
    data.update(over)
    run_cache(parse_config(data, CacheConfig), progress=None)
    return store


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_teacher, smollm2_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("multi_teacher")
    t0 = make_tiny_teacher(root / "t0", smollm2_tokenizer, seed=0, initializer_range=0.5)
    t1 = _perturbed(t0, root / "t1", smollm2_tokenizer, seed=1)
    corpus = _corpus(root / "corpus")
    return {
        "root": root, "t0": t0, "t1": t1, "corpus": corpus,
        "a": _cache(root / "a", t0, corpus, k=8),
        "b": _cache(root / "b", t1, corpus, k=6, shard_rows=3),
    }


def _readers(*stores: Path) -> list[StoreReader]:
    return [StoreReader(str(s)) for s in stores]


def _assert_rows_match(batch: dict, a: StoreReader, b: StoreReader) -> None:
    ids = batch["sample_id"].numpy()
    own_a = a.read_samples(ids, ["topk_ids", "topk_logp", "topk_tail", "valid"])
    own_b = b.read_samples(ids, ["topk_ids", "topk_logp", "topk_tail"])
    for name, value in own_a.items():
        np.testing.assert_array_equal(batch[name].numpy(), value, err_msg=name)
    for name, value in own_b.items():
        np.testing.assert_array_equal(batch[f"t1/{name}"].numpy(), value, err_msg=name)
    assert not np.array_equal(own_a["topk_ids"][..., :6], own_b["topk_ids"])  # two different teachers


# ---------------------------------------------------------------- the join


def test_joined_batches_equal_each_stores_rows_and_resume(setup):
    a, b = _readers(setup["a"], setup["b"])
    assert a.record(a.shard_ids()[0]).rows != b.record(b.shard_ids()[0]).rows  # shards do not line up
    stream = KDStream(a, FIELDS, 3, seed=0, buffer_rows=4, rank=0, world_size=1, joined=[b])
    batches = list(stream)
    assert sorted(i for x in batches for i in x["sample_id"].tolist()) == sorted(a.sample_ids().tolist())
    for batch in batches:
        _assert_rows_match(batch, a, b)
    # the primary stream's state is the whole state: resume after 2 batches gives the same rest
    plain = KDStream(a, ["valid"], 3, seed=0, buffer_rows=4, rank=0, world_size=1)
    assert [x["sample_id"].tolist() for x in plain] == [x["sample_id"].tolist() for x in batches]
    first = KDStream(a, FIELDS, 3, seed=0, buffer_rows=4, rank=0, world_size=1, joined=[b])
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    resumed = KDStream(a, FIELDS, 3, seed=0, buffer_rows=4, rank=0, world_size=1, joined=[str(setup["b"])])
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [x["sample_id"].tolist() for x in rest] == [x["sample_id"].tolist() for x in batches[2:]]
    for x, y in zip(rest, batches[2:], strict=True):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in FIELDS)


def test_join_in_dataloader_workers(setup):
    """The join runs where the shard is decoded: in the workers (forkserver) too."""
    a, b = _readers(setup["a"], setup["b"])
    loader = KDLoader(KDStream(a, FIELDS, 4, seed=1, rank=0, world_size=1, joined=[b]), num_workers=2)
    batches = list(loader)
    assert sorted(i for x in batches for i in x["sample_id"].tolist()) == sorted(a.sample_ids().tolist())
    for batch in batches:
        _assert_rows_match(batch, a, b)
    assert loader.state_dict()["epoch"] == 1


def test_a_row_whose_tokens_differ_is_refused(setup):
    a, b = _readers(setup["a"], setup["b"])
    join = StoreJoin([a, b], ["t1/topk_ids"])
    rows = a.read_shard(a.shard_ids()[0], join.primary_fields)
    rows["input_ids"][1, 5] += 1
    sid = int(rows["sample_id"][1])
    want = rf"sample id\(s\) \[{sid}\]: input_ids of store '.*/b' \(teacher 1\) differ from store '.*/a' \(teacher 0\)"
    with pytest.raises(StoreMismatchError, match=want):
        join.read(rows)
    with pytest.raises(MissingFieldError, match=r"'t2/topk_ids' belongs to teacher 2, but only 2 store\(s\) are joined"):
        StoreJoin([a, b], ["t2/topk_ids"])


def test_other_corpus_or_packing_is_refused_naming_store_and_keys(setup):
    root = setup["root"]
    short = _cache(root / "short_rows", setup["t1"], setup["corpus"], k=6, row_length=16)
    want = (r"store '.*/short_rows' \(teacher 1\) vs store '.*/a' \(teacher 0\): row_length 16 vs 32; "
            r"provenance packing differs at key\(s\) \['row_length'\] \(row_length: 16 vs 32\)")
    with pytest.raises(StoreMismatchError, match=want):
        check_aligned(_readers(setup["a"], short))
    other = _cache(root / "other_corpus", setup["t1"], _corpus(root / "corpus2", seed=1), k=6)
    want = r"store '.*/other_corpus' \(teacher 1\).*provenance corpus differs at key\(s\) \['paths'\]"
    with pytest.raises(StoreMismatchError, match=want):
        check_aligned(_readers(setup["a"], other))
    cfg = _train_cfg(setup, root / "run", extra_stores=[str(setup["b"]), str(other)])
    with pytest.raises(StoreMismatchError, match=r"'.*/other_corpus' \(teacher 2\)"):
        Trainer(TrainConfig(**cfg))
    assert not (root / "run").exists()


def test_missing_sample_ids_are_counted(setup):
    partial = _cache(setup["root"] / "partial", setup["t1"], setup["corpus"], k=6, max_tokens=64)
    a, p = _readers(setup["a"], partial)
    missing = len(a.sample_ids()) - len(p.sample_ids())
    assert missing > 0
    n = len(a.sample_ids())
    want = rf"store '.*/partial' \(teacher 1\) lacks {missing} of the {n} sample ids of store '.*/a' \(teacher 0\) \(e\.g\. \["
    with pytest.raises(StoreMismatchError, match=want):
        check_aligned([a, p])
    want = rf"store '.*/partial' \(teacher 0\) lacks {missing} of the {n} sample ids of store '.*/a' \(teacher 1\)"
    with pytest.raises(StoreMismatchError, match=want):
        check_aligned([p, a])  # the other way round: the primary lacks rows of teacher 1


def test_another_vocabulary_is_refused(setup, tmp_path):
    a = StoreReader(str(setup["a"]))
    spec = StoreSpec(vocab_size=256, row_length=32, shard_rows=4, topk=TopKSpec(k=4))
    writer = StoreWriter(str(tmp_path / "small"), spec, a.meta.provenance)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 32, 256))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, -1)[..., :4]
    kept = np.take_along_axis(logp, ids, -1)
    writer.write_shard("x-all-0", {
        "sample_id": np.arange(2), "input_ids": rng.integers(0, 256, (2, 32)), "doc_ids": np.zeros((2, 32), np.int32),
        "valid": np.ones((2, 32), bool), "topk_ids": ids, "topk_logp": kept.astype(np.float32),
        "topk_tail": (1 - np.exp(kept).sum(-1)).astype(np.float32)})
    with pytest.raises(StoreMismatchError, match=r"vocabulary size 256 .* 49152 .*cross-tokenizer distillation needs an alignment method"):
        check_aligned([a, StoreReader(str(tmp_path / "small"))])


# ---------------------------------------------------------------- training


def _train_cfg(setup: dict, out: Path, **over) -> dict:
    data = {"store": str(setup["a"]), "extra_stores": [str(setup["b"])], "out": str(out),
            "student": {"init": "teacher_layers", "teacher": str(setup["t0"]), "num_layers": 1},
            "losses": [{"name": "multi_teacher", "weights": [0.5, 0.5]}],
            "batch_size": 2, "steps": 2, "lr": 1e-3, "warmup_steps": 1, "device": "cpu", "tensorboard": False}
    data.update(over)
    return data


@pytest.mark.parametrize("mode", ["per_teacher", "mixture"])
def test_train_two_steps(setup, tmp_path, mode):
    losses = [{"name": "multi_teacher", "mode": mode, "weights": [0.5, 0.5]}, {"name": "ce", "weight": 0.1}]
    trainer = Trainer(TrainConfig(**_train_cfg(setup, tmp_path / "run", losses=losses)))
    assert {"t1/topk_ids", "t1/topk_logp", "t1/topk_tail"} <= set(trainer.stream.fields)
    trainer.train(progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    keys = ["fkl_t0", "fkl_t1"] if mode == "per_teacher" else ["fkl_mix"]
    for entry in log:
        assert all(math.isfinite(entry[k]) and entry[k] > 0 for k in keys)
        parts = 0.5 * entry["fkl_t0"] + 0.5 * entry["fkl_t1"] if mode == "per_teacher" else entry["fkl_mix"]
        assert math.isclose(entry["loss"], parts + 0.1 * entry["ce"], rel_tol=1e-5)
    if mode == "per_teacher":
        assert log[0]["fkl_t0"] != log[0]["fkl_t1"]
    else:  # the ids kept by both teachers are explicit buckets at most positions
        batch = next(iter(trainer.stream))
        kept_by_both = (batch["topk_ids"][..., :, None] == batch["t1/topk_ids"][..., None, :]).any(-1).any(-1)
        assert kept_by_both[batch["valid"]].float().mean() > 0.5
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_bad_training_configs(setup, tmp_path):
    with pytest.raises(LossConfigError, match=r"3 weights \(teachers 0..2\) but only 2 store\(s\) are joined"):
        Trainer(TrainConfig(**_train_cfg(setup, tmp_path / "a", losses=[{"name": "multi_teacher", "weights": [1, 1, 1]}])))
    with pytest.raises(LossConfigError, match=r"but only 1 store\(s\) are joined"):
        train(_train_cfg(setup, tmp_path / "b", extra_stores=[]), progress=False)
    with pytest.raises(ConfigError, match="extra_stores .* cannot be used with online_teacher"):
        train(_train_cfg(setup, tmp_path / "c", online_teacher=str(setup["t0"])), progress=False)
    assert joined_field_names(_readers(setup["a"], setup["b"]))[-1] == "t1/topk_tail"
