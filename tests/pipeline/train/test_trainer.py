"""The student trainer on a tiny store: logging, schedule, exact resume (also after SIGKILL),
bad input, alignment and dual-space losses, online KD, DDP on CPU.

One module-scoped store (tiny random teacher: width 64, 2 layers; rows of 32 tokens, 10 rows in
4 shards; top-8 + hidden_2 + attention layer 1 heads [0, 1]) serves every test; tests that
damage a store copy it first.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore.errors import CorruptShardError, NotAStoreError
from kdstore.reader import StoreReader
from kdstore.records import COMMIT_JSON_INDENT, CommitRecord, json_bytes
from kdstore.torch_stream import KDStream
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config
from pipeline.train.losses import MissingLossFieldError, NonFiniteLossError, UnknownLossError
from pipeline.train.trainer import CHECKPOINT, TrainConfig, Trainer, lr_factor, train

REPO = Path(__file__).resolve().parents[3]
WORDS = ("the cat sat on a mat while python code ran fast and students learned from "
         "teachers quietly near old stone bridges under grey skies").split()
BATCH = 2


def _corpus(folder: Path, files: int = 2, words: int = 150, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + ".")
    return folder


def _make_store(store: Path, teacher: Path, corpus: Path, signals: dict) -> Path:
    cfg = parse_config({
        "store": str(store), "teacher": {"name": str(teacher), "batch_size": 4},
        "corpus": {"kind": "files", "paths": [str(corpus)]}, "row_length": 32, "shard_rows": 4,
        "split": "all", "signals": signals,
    }, CacheConfig)
    run_cache(cfg, progress=None)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("trainer_store")
    return _make_store(root / "store", tiny_teacher_dir, _corpus(root / "corpus"), {
        "topk": {"k": 8}, "hidden": {"layers": [2]}, "attention": {"layers": [1], "heads": [0, 1]},
    })


def _cfg(store: Path, out: Path, teacher: Path, **over) -> dict:
    data = {
        "store": str(store), "out": str(out),
        "student": {"init": "teacher_layers", "teacher": str(teacher), "num_layers": 1},
        "losses": [{"name": "fkl"}, {"name": "ce", "weight": 0.5}],
        "batch_size": BATCH, "steps": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 100,
        "device": "cpu", "tensorboard": False,
    }
    data.update(over)
    return data


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def _checkpoint(out: Path) -> dict:
    return torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=False)


def _first_batches(store: Path, n: int, seed: int = 0, buffer_rows: int = 256) -> list[list[int]]:
    """The sample ids of the trainer's first n batches (the stream's order is a pure function)."""
    stream = KDStream(StoreReader(str(store)), ["valid"], BATCH, seed=seed, buffer_rows=buffer_rows, rank=0, world_size=1)
    out = []
    for batch in stream:
        out.append(batch["sample_id"].tolist())
        if len(out) == n:
            break
    return out


def _all_sample_ids(store: Path) -> set[int]:
    r = StoreReader(str(store))
    return {int(x) for s in r.shard_ids() for x in r.read_shard(s, ["sample_id"])["sample_id"]}


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- basics


def test_lr_factor_is_warmup_then_cosine():
    cfg = TrainConfig(store="s", out="o", steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg) == 1.0
    decay = [lr_factor(s, cfg) for s in range(4, 11)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert math.isclose(lr_factor(7, cfg), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_factor(10, cfg), 0.1) and math.isclose(lr_factor(50, cfg), 0.1)
    no_warmup = TrainConfig(store="s", out="o", steps=5, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, no_warmup) == 1.0 and math.isclose(lr_factor(5, no_warmup), 0.0, abs_tol=1e-12)


def test_few_steps_log_model_and_schedule(store, tiny_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = _cfg(store, out, tiny_teacher_dir, steps=5, checkpoint_every=2)
    result = train(cfg, progress=False)
    assert result["steps"] == 5
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5]
    parsed = TrainConfig(**cfg)
    for entry in log:
        assert {"fkl", "ce", "loss", "lr", "tokens_per_s", "sample_ids"} <= entry.keys()
        assert all(math.isfinite(entry[k]) for k in ("fkl", "ce", "loss", "tokens_per_s"))
        assert math.isclose(entry["loss"], entry["fkl"] + 0.5 * entry["ce"], rel_tol=1e-5)
        # the logged lr is the one the step used: warm-up then cosine
        assert math.isclose(entry["lr"], 1e-3 * lr_factor(entry["step"] - 1, parsed), rel_tol=1e-9)
        assert entry["tokens_per_s"] > 0 and len(entry["sample_ids"]) == BATCH
    assert [e["sample_ids"] for e in log] == _first_batches(store, 5)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    _assert_same_params({k: v for k, v in model.state_dict().items()}, _checkpoint(out)["model"])
    assert model.config.num_hidden_layers == 1 and model.config.kdcache_teacher_layers == [1]
    assert _checkpoint(out)["step"] == 5


# ---------------------------------------------------------------- exact resume


def test_resume_at_an_epoch_boundary_is_exact(store, tiny_teacher_dir, tmp_path):
    """10 rows, batch 2: a checkpoint after step 5 sits at the very end of epoch 0."""
    cfg_a = _cfg(store, tmp_path / "a", tiny_teacher_dir, steps=7)
    train(cfg_a, progress=False)
    cfg_b = _cfg(store, tmp_path / "b", tiny_teacher_dir, steps=7)
    first = Trainer(TrainConfig(**cfg_b))
    batches = first.batches()
    ids = [first.train_step(batches)["sample_ids"] for _ in range(5)]
    first.save_checkpoint()
    assert first.loader.state_dict()["epoch"] == 0 and first.loader.state_dict()["consumed"] == {0: 10}
    del first, batches
    train(cfg_b, progress=False)  # resumes at step 5
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [e["step"] for e in log_b] == [6, 7]
    assert ids + [e["sample_ids"] for e in log_b] == [e["sample_ids"] for e in log_a]
    assert [e["loss"] for e in log_b] == [e["loss"] for e in log_a[5:]]
    _assert_same_params(_checkpoint(tmp_path / "a")["model"], _checkpoint(tmp_path / "b")["model"])


_KILLABLE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pipeline.train import trainer
step = trainer.Trainer.step_on_device
def slow_step(self, batches):  # slow enough to be killed mid-run
    time.sleep({sleep})
    return step(self, batches)
trainer.Trainer.step_on_device = slow_step
trainer.train(json.loads(open(sys.argv[1]).read()), progress=False)
"""


def _train_process(cfg: dict, tmp_path: Path, name: str, threads: int, sleep: float = 0.0) -> subprocess.Popen:
    """A training run in a fresh process with `threads` CPU threads from its environment."""
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(tmp_path / f"{name}.stderr", "wb") as err:
        return subprocess.Popen([sys.executable, "-c", _KILLABLE.format(repo=str(REPO), sleep=sleep),
                                 str(tmp_path / f"{name}.json")],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


@pytest.mark.slow
def test_killed_run_resumes_exactly(store, tiny_teacher_dir, tmp_path):
    """Run B is a real process killed with SIGKILL after step >= 3 is checkpointed, then resumed
    in a new process whose environment asks for another thread count: the resumed run takes the
    checkpoint's (float results depend on it) and ends bit for bit where the straight run A ends.
    Every run is a fresh process, so the claim holds whatever this test process did before."""
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    run_a = _train_process(_cfg(store, out_a, tiny_teacher_dir, steps=6, checkpoint_every=1), tmp_path, "a", 2)
    cfg_b = _cfg(store, out_b, tiny_teacher_dir, steps=6, checkpoint_every=1)
    proc = _train_process(cfg_b, tmp_path, "b", 2, sleep=0.4)
    log_path = out_b / "train_log.jsonl"
    deadline = time.time() + 180
    reached = False
    try:
        # a logged step 4 means step 3's checkpoint (saved right after step 3's line) is on disk
        while not reached and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            reached = any(json.loads(x)["step"] >= 4 for x in lines if x.endswith("}"))
        alive = proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert reached and alive, f"run B was not killed mid-run: {(tmp_path / 'b.stderr').read_text()[-3000:]}"
    killed_at = _checkpoint(out_b)["step"]
    assert 3 <= killed_at < 6 and _checkpoint(out_b)["threads"] == 2
    resumed = _train_process(cfg_b, tmp_path, "b2", 1)  # resumes from the checkpoint, to step 6
    assert resumed.wait(timeout=300) == 0, (tmp_path / "b2.stderr").read_text()[-3000:]
    assert run_a.wait(timeout=300) == 0, (tmp_path / "a.stderr").read_text()[-3000:]
    assert _checkpoint(out_b)["threads"] == 2  # taken from the checkpoint, not from OMP_NUM_THREADS=1
    log_a, log_b = _log(out_a), _log(out_b)
    assert [e["step"] for e in log_b] == [1, 2, 3, 4, 5, 6]  # lines past the checkpoint were dropped, not doubled
    assert [e["sample_ids"] for e in log_b] == [e["sample_ids"] for e in log_a]
    assert [e["loss"] for e in log_b] == [e["loss"] for e in log_a]  # bitwise: same floats
    _assert_same_params(_checkpoint(out_a)["model"], _checkpoint(out_b)["model"])
    state_a, state_b = _checkpoint(out_a)["optimizer"]["state"], _checkpoint(out_b)["optimizer"]["state"]
    for i in state_a:
        assert torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"])


def test_threads_are_pinned_by_config_and_recorded(store, tiny_teacher_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        train(_cfg(store, tmp_path / "r", tiny_teacher_dir, steps=1, threads=1), progress=False)
        assert torch.get_num_threads() == 1 and _checkpoint(tmp_path / "r")["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_resume_with_another_topology_is_refused(store, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(store, out, tiny_teacher_dir, steps=2), progress=False)  # mid-epoch checkpoint
    with pytest.raises(ValueError, match=r"saved with 1 data stream\(s\) per rank \(num_workers 0 or 1\), this run has num_workers=2"):
        Trainer(TrainConfig(**_cfg(store, out, tiny_teacher_dir, steps=4, num_workers=2)))
    state = _checkpoint(out)
    state["stream"] = [state["stream"], state["stream"]]  # as a 2-rank run saves it
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(ValueError, match=r"saved by 2 rank\(s\), this run has world size 1"):
        Trainer(TrainConfig(**_cfg(store, out, tiny_teacher_dir, steps=4)))


# ---------------------------------------------------------------- bad input


def test_missing_store_field_is_refused_before_training(store, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(MissingLossFieldError, match=r"loss 'hidden' needs store field\(s\) \['hidden_1'\]"):
        train(_cfg(store, out, tiny_teacher_dir, losses=[{"name": "fkl"}, {"name": "hidden", "layer_map": [[1, 1]]}]))
    with pytest.raises(MissingLossFieldError, match=r"loss 'sampled_kd' needs store field\(s\) \['draw_ids', 'draw_counts'\]"):
        train(_cfg(store, out, tiny_teacher_dir, losses=[{"name": "sampled_kd"}]))
    assert not out.exists()  # nothing was trained or written


def test_store_without_hidden_states_refuses_hidden_losses(tmp_path_factory, tiny_teacher_dir, tmp_path):
    root = tmp_path_factory.mktemp("topk_only")
    topk_only = _make_store(root / "store", tiny_teacher_dir, _corpus(root / "corpus", files=1, words=40), {"topk": {"k": 4}})
    with pytest.raises(MissingLossFieldError, match=r"loss 'hidden' needs store field\(s\) \['hidden_<layer>'\]"):
        train(_cfg(topk_only, tmp_path / "a", tiny_teacher_dir, losses=[{"name": "hidden"}]))
    with pytest.raises(MissingLossFieldError, match=r"loss 'dskd' needs store field\(s\) \['hidden_<last layer>'\]"):
        train(_cfg(topk_only, tmp_path / "b", tiny_teacher_dir, losses=[{"name": "dskd"}]))


def test_unknown_loss_lists_the_known_ones(store, tiny_teacher_dir, tmp_path):
    with pytest.raises(UnknownLossError, match=r"unknown loss 'fk1'; known losses: .*dskd.*fkl.*sampled_kd"):
        train(_cfg(store, tmp_path / "run", tiny_teacher_dir, losses=[{"name": "fk1"}]))


def test_not_a_store_is_refused(tiny_teacher_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(NotAStoreError, match=f"no kdcache store at '{path}'"):
            train(_cfg(path, tmp_path / "run", tiny_teacher_dir))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.json").write_text("{not json")
    with pytest.raises(NotAStoreError, match="not valid JSON"):
        train(_cfg(tmp_path / "bad", tmp_path / "run", tiny_teacher_dir))


def _corrupt_copy(store: Path, tmp_path: Path) -> tuple[Path, str, int]:
    """A copy of the store with the topk_logp file of the shard the stream meets last truncated;
    returns (copy, shard id, number of batches before the one that reads it)."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    reader = StoreReader(str(copy))
    order = KDStream(reader, ["valid"], BATCH, seed=0, buffer_rows=256, rank=0, world_size=1).worker_order(0, 0, 1)
    first = {int(s): int(np.argmax(order[:, 0] == s)) // BATCH for s in np.unique(order[:, 0])}
    index = max(first, key=first.get)
    shard = reader.shard_ids()[index]
    target = copy / "shards" / shard / "topk_logp.arrow"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return copy, shard, first[index]


def test_corrupt_shard_stops_with_a_checkpoint(store, tiny_teacher_dir, tmp_path):
    copy, shard, before = _corrupt_copy(store, tmp_path)
    assert before >= 1  # met mid-training
    out = tmp_path / "run"
    with pytest.raises(CorruptShardError, match=rf"{shard}.*topk_logp\.arrow.*training stopped at step {before}") as info:
        train(_cfg(copy, out, tiny_teacher_dir, steps=5, on_corrupt_shard="stop"), progress=False)
    assert "on_corrupt_shard: skip" in str(info.value)
    assert _checkpoint(out)["step"] == before and len(_log(out)) == before


def test_corrupt_shard_skipped(store, tiny_teacher_dir, tmp_path):
    copy, shard, _ = _corrupt_copy(store, tmp_path)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipping corrupt shard.*{shard}"):
        result = train(_cfg(copy, out, tiny_teacher_dir, steps=5, on_corrupt_shard="skip"), progress=False)
    assert result["steps"] == 5 and (out / "model").is_dir()
    assert result["corrupt_shards_skipped"] == 1 and "topk_logp.arrow" in result["corrupt_shards"][shard]
    bad = {int(x) for x in StoreReader(str(store)).read_shard(shard, ["sample_id"])["sample_id"]}
    seen = {i for e in _log(out) for i in e["sample_ids"]}
    assert seen and not seen & bad
    assert all(math.isfinite(e["loss"]) for e in _log(out))


def test_nan_loss_names_step_component_and_samples(store, tiny_teacher_dir, smollm2_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "nan_student"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    ids = _first_batches(store, 1)[0]
    cfg = _cfg(store, tmp_path / "run", tiny_teacher_dir, student={"init": "pretrained", "path": str(folder)})
    # read at the first log step (log_every 10, steps 4: the last): the error names the step it happened at
    with pytest.raises(NonFiniteLossError, match=rf"step 1 \(of steps 1-4 read together\): .*fkl=nan.*ce=nan.*"
                                                 rf"sample ids \[{ids[0]}, {ids[1]}\]"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / CHECKPOINT).exists()  # nothing non-finite was checkpointed


# ---------------------------------------------------------------- alignment and dual-space losses


def _train_watching_loss_params(cfg: dict) -> tuple[Trainer, dict, dict]:
    trainer = Trainer(TrainConfig(**cfg))
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.loss.named_parameters())
    assert named and all(id(p) in optimized for p in named.values())  # projections are optimised
    before = {k: v.detach().clone() for k, v in named.items()}
    trainer.train(progress=False)
    return trainer, before, dict(trainer.loss.named_parameters())


def test_feature_alignment_trains(store, tiny_teacher_dir, tmp_path):
    """A narrower random student (width 32 ≠ 64): the hidden loss owns a learned projection."""
    student = {"init": "config", "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}}
    cfg = _cfg(store, tmp_path / "run", tiny_teacher_dir, student=student, steps=3, losses=[{"name": "fakd"}])
    trainer, before, after = _train_watching_loss_params(cfg)
    assert trainer.student.model.config._attn_implementation == "eager"  # attention maps need eager
    log = _log(tmp_path / "run")
    assert len(log) == 3 and all(math.isfinite(e[k]) for e in log for k in ("hidden_zmse", "attn_kl", "fkl", "loss"))
    assert all(not torch.equal(before[k], after[k]) for k in before)
    state = _checkpoint(tmp_path / "run")["loss"]
    assert any(".projections." in k for k in state)  # saved with the checkpoint


def test_dual_space_kd_trains(store, tiny_teacher_dir, tmp_path):
    cfg = _cfg(store, tmp_path / "run", tiny_teacher_dir, steps=3, losses=[{"name": "dskd"}, {"name": "ce", "weight": 0.5}])
    _, before, after = _train_watching_loss_params(cfg)
    assert {k.split(".")[-2] for k in before} == {"s2t", "t2s"}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    log = _log(tmp_path / "run")
    assert all(math.isfinite(e[k]) for e in log for k in ("dskd_s2t", "dskd_t2s", "dskd_t2s_ce", "ce", "loss"))


# ---------------------------------------------------------------- online KD


def test_online_teacher_runs_with_alignment_losses(store, tiny_teacher_dir, tmp_path):
    """The online teacher extracts the signals of the store's spec the losses read (hidden and
    attention here)."""
    cfg = _cfg(store, tmp_path / "run", tiny_teacher_dir, steps=2, online_teacher=str(tiny_teacher_dir),
               losses=[{"name": "fakd"}])
    train(cfg, progress=False)
    log = _log(tmp_path / "run")
    assert len(log) == 2 and all(math.isfinite(e[k]) for e in log for k in ("hidden_zmse", "attn_kl", "fkl"))


def test_bf16_auto_follows_the_cpu_and_trains(store, tiny_teacher_dir, tmp_path):
    """bf16 "auto": autocast on CUDA and on CPUs with AMX tiles; a bf16 run trains to finite
    losses that differ from float32's; any other string is refused, naming the key."""
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    auto = Trainer(parse_config(_cfg(store, tmp_path / "auto", tiny_teacher_dir, bf16="auto"), TrainConfig))
    assert auto.bf16 is amx
    for mode in (True, False):
        train(_cfg(store, tmp_path / str(mode), tiny_teacher_dir, steps=2, bf16=mode), progress=False)
    bf16, fp32 = (_log(tmp_path / str(mode)) for mode in (True, False))
    assert all(math.isfinite(e["loss"]) for e in bf16) and bf16[0]["loss"] != fp32[0]["loss"]
    with pytest.raises(Exception, match="bf16"):
        parse_config(_cfg(store, tmp_path / "x", tiny_teacher_dir, bf16="maybe"), TrainConfig)


def test_online_spec_keeps_only_the_signals_the_losses_read(store):
    from pipeline.train.losses import required_fields
    from pipeline.train.online_teacher import online_spec

    spec = StoreReader(store).spec
    assert spec.hidden is not None and spec.attention is not None  # the fixture store holds both
    names = StoreReader(store).field_names
    plain = online_spec(spec, required_fields([{"name": "fkl"}], names))
    assert plain.hidden is None and plain.attention is None and plain.topk == spec.topk
    fakd = online_spec(spec, required_fields([{"name": "fakd"}], names))
    assert fakd.hidden == spec.hidden and fakd.attention == spec.attention


def test_online_full_logits_trains_and_needs_an_online_teacher(store, tiny_teacher_dir, tmp_path):
    cfg = _cfg(store, tmp_path / "full", tiny_teacher_dir, steps=2, online_teacher=str(tiny_teacher_dir),
               online_full_logits=True, losses=[{"name": "fkl"}])
    train(cfg, progress=False)
    log = _log(tmp_path / "full")
    assert len(log) == 2 and all(math.isfinite(e["fkl"]) and e["fkl"] >= 0 for e in log)
    with pytest.raises(Exception, match="online_full_logits needs online_teacher"):
        parse_config(_cfg(store, tmp_path / "x", tiny_teacher_dir, online_full_logits=True), TrainConfig)


@pytest.mark.slow
def test_online_kd_first_step_matches_the_cache(tmp_path, make_tiny_teacher, smollm2_tokenizer):
    """Same seed, same batch, fkl: online and cached first-step losses agree.

    The random tiny teacher is nearly uniform (top-8 mass 3e-4, fkl ~4e-6), so its KL is all
    quantisation noise; a teacher with large initial weights is peaked (top-8 mass ~0.5, fkl ~8).
    The cache rounds each kept log-prob to a step of 1/16 (error <= 1/32), which moves each kept
    term p·log(p/q) by at most ~p·(1/32)·(1 + |log p/q|): ~2 % of this KL in the worst case; the
    rounding errors are unbiased and average out over the 512 kept entries of the batch
    (measured: 1e-3). Tolerance: rel 1e-2.
    """
    teacher = make_tiny_teacher(tmp_path / "peaked", smollm2_tokenizer, initializer_range=0.5)
    peaked = _make_store(tmp_path / "store", teacher, _corpus(tmp_path / "corpus"), {"topk": {"k": 8}})
    common = {"losses": [{"name": "fkl"}], "steps": 1}
    cached = train(_cfg(peaked, tmp_path / "cached", teacher, **common), progress=False)["last"]
    online = train(_cfg(peaked, tmp_path / "online", teacher, online_teacher=str(teacher), **common), progress=False)["last"]
    assert _log(tmp_path / "cached")[0]["sample_ids"] == _log(tmp_path / "online")[0]["sample_ids"]
    assert cached["fkl"] > 1.0
    assert math.isclose(online["fkl"], cached["fkl"], rel_tol=1e-2)


# ---------------------------------------------------------------- DDP


_DDP_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {repo!r})
from pipeline.train import trainer
seen = []
step = trainer.Trainer.step_on_device
def recording_step(self, batches):
    stats = step(self, batches)
    seen.append(stats["sample_ids"])
    return stats
trainer.Trainer.step_on_device = recording_step
t = trainer.Trainer(trainer.TrainConfig(**json.loads(open(sys.argv[1]).read())))
t.train(progress=False)
def digest(module):
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in module.parameters())).hexdigest()
report = {{"rank": t.rank, "world": t.world, "sample_ids": seen, "model": digest(t.student.model), "loss": digest(t.loss)}}
open(sys.argv[2] + f"/rank{{t.rank}}.json", "w").write(json.dumps(report))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(store, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(store, out, tiny_teacher_dir, steps=3, losses=[{"name": "fkl"}, {"name": "dskd", "weight": 0.5}])
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "ddp.py").write_text(_DDP_SCRIPT.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path / "ddp.py"), str(tmp_path / "cfg.json"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    ids = [[i for batch in r["sample_ids"] for i in batch] for r in reports]
    assert all(len(x) == 5 for x in ids)  # 10 rows: 5 per rank (batches of 2, 2, 1)
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) == _all_sample_ids(store)
    assert reports[0]["model"] == reports[1]["model"]  # DDP kept the student in sync
    assert reports[0]["loss"] == reports[1]["loss"]  # and the loss's projections
    state = _checkpoint(out)
    assert state["step"] == 3 and isinstance(state["stream"], list) and len(state["stream"]) == 2
    assert [s["consumed"] for s in state["stream"]] == [{0: 5}, {1: 5}]  # keyed by rank × worker
    assert [e["sample_ids"] for e in _log(out)] == reports[0]["sample_ids"]  # the log is rank 0's
    assert (out / "model" / "config.json").is_file()
    with pytest.raises(ValueError, match=r"saved by 2 rank\(s\), this run has world size 1"):
        Trainer(TrainConfig(**{**cfg, "steps": 4}))


def test_every_alteration_of_every_file_the_trainer_reads_is_skipped(store, tiny_teacher_dir, tmp_path):
    """Copies of one shard, each with one file altered one way (flip, truncate, append, delete):
    a run reading every field (fkl + hidden + attention) skips every copy, naming the file."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    first = StoreReader(str(copy)).shard_ids()[0]
    source = copy / "shards" / first
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file() and p.name != "COMMIT.json")
    rng = np.random.default_rng(7)
    altered = {}
    for j, rel in enumerate(files):
        for how in ("flip", "truncate", "append", "delete"):
            shard = f"x{j:02d}{how}"
            shutil.copytree(source, copy / "shards" / shard)
            meta = copy / "shards" / shard / "COMMIT.json"
            record = json.loads(meta.read_text())
            record.update(shard_id=shard)
            record.pop("record_sha256")
            meta.write_bytes(json_bytes(CommitRecord.from_json(record).to_json(), COMMIT_JSON_INDENT))
            target = copy / "shards" / shard / rel
            data = target.read_bytes()
            at = int(rng.integers(len(data)))
            if how == "flip":
                target.write_bytes(data[:at] + bytes([data[at] ^ 1 << int(rng.integers(8))]) + data[at + 1:])
            elif how == "truncate":
                target.write_bytes(data[:at])
            elif how == "append":
                target.write_bytes(data + b"\0")
            else:
                target.unlink()
            altered[shard] = rel
    out = tmp_path / "run"
    losses = [{"name": "fkl"}, {"name": "hidden"}, {"name": "attention"}]
    steps = StoreReader(str(store)).num_rows() + 1  # an epoch yields a batch per clean row at most: one epoch whole
    with pytest.warns(UserWarning, match="skipping corrupt shard"):
        result = train(_cfg(copy, out, tiny_teacher_dir, steps=steps, batch_size=8, on_corrupt_shard="skip",
                            losses=losses), progress=False)
    assert result["steps"] == steps and all(math.isfinite(e["loss"]) for e in _log(out))
    assert set(result["corrupt_shards"]) == set(altered) and result["corrupt_shards_skipped"] == len(altered) >= 20
    assert all(f"shard {s}, file {altered[s]}" in why for s, why in result["corrupt_shards"].items())


@pytest.mark.slow
def test_the_issue_cases_stop_with_one_line_naming_the_file(store, tiny_teacher_dir, tmp_path, capsys):
    """One bit flipped in one file of every shard (tokens, topk_ids, topk_tail, topk_logp at 30, 60
    and 90 % of the file), then `kdcache train --no-flow`: every case stops before step 1 with
    exit 2 and one line naming store, shard and file; none trains on."""
    import yaml

    from flows.cli import main

    for name in ("tokens", "topk_ids", "topk_tail", "topk_logp"):
        for at in (0.3, 0.6, 0.9):
            copy = tmp_path / f"{name}-{at}"
            shutil.copytree(store, copy / "store")
            for target in (copy / "store" / "shards").glob(f"*/{name}.arrow"):
                data = bytearray(target.read_bytes())
                data[int(len(data) * at)] ^= 0x04
                target.write_bytes(bytes(data))
            config = copy / "train.yaml"
            config.write_text(yaml.safe_dump(_cfg(copy / "store", copy / "run", tiny_teacher_dir, steps=4)))
            assert main(["train", str(config), "--no-flow"]) == 2, (name, at)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"file {name}.arrow" in err and "training stopped at step 0" in err, err
            log = copy / "run" / "train_log.jsonl"
            assert "internal error" not in err and (not log.exists() or not log.read_text().strip())  # no step
