"""TRL's SFTTrainer from a store (`KDSFTTrainer`): the same steps as `kdcache train` on a plain
and a chat store, a chat store's loss_mask decides what is trained, and TRL datasets are joined
to the store by sample id (a row the store lacks is a one-line error before the first step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from kdstore.errors import StoreMismatchError
from kdstore.reader import StoreReader
from pipeline.train.hf_trainer import kd_fields
from pipeline.train.losses import fold_loss_mask
from pipeline.train.store_rows import KDCollator, StoreRows
from pipeline.train.student import StudentConfig, build_student
from pipeline.train.trainer import TrainConfig, lr_factor, make_optimizer, train
from pipeline.train.trl_trainer import KDSFTTrainer
from tests.chat_docs import cache_chat, write_chat_corpus

LOSSES = [{"name": "fkl"}, {"name": "ce", "weight": 0.5}]


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, tiny_teacher_dir) -> str:
    root = tmp_path_factory.mktemp("trl_plain")
    return str(cache_short_docs(root / "store", tiny_teacher_dir, write_short_docs(root), split="all"))


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory, tiny_teacher_dir) -> str:
    root = tmp_path_factory.mktemp("trl_chat")
    return str(cache_chat(root / "store", tiny_teacher_dir, write_chat_corpus(root)))


def _student(reader: StoreReader, teacher: Path, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(StudentConfig(init="teacher_layers", teacher=str(teacher), num_layers=1), reader, False, "cpu")


def _sft_config(out: Path, steps: int, **over):
    from trl import SFTConfig

    values = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, max_grad_norm=1.0,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0,
                  bf16=False, gradient_checkpointing=False)  # SFTConfig's defaults are True: float32 for parity
    return SFTConfig(**{**values, **over})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_trl_takes_the_same_steps_as_kdcache_train(kind, plain_store, chat_store, tiny_teacher_dir, tmp_path):
    store = plain_store if kind == "plain" else chat_store
    fused = kind == "plain"  # fused output losses on one store, whole logits on the other: both paths
    steps = 5
    cfg = TrainConfig(store=store, out=str(tmp_path / "ours"), losses=LOSSES, batch_size=2, steps=steps, lr=1e-3,
                      warmup_steps=2, clip=1.0, device="cpu", tensorboard=False, checkpoint_every=100,
                      student={"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 1},
                      fused_loss=fused)
    train(cfg, progress=False)
    ours = [json.loads(x) for x in (tmp_path / "ours" / "train_log.jsonl").read_text().splitlines()]

    reader = StoreReader(store)
    student = _student(reader, tiny_teacher_dir, cfg.seed)
    model = student.model
    optimizer = make_optimizer(list(model.parameters()), cfg)  # the Trainer's AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    rows = StoreRows(reader, kd_fields(reader, LOSSES, model), seed=cfg.seed, buffer_rows=cfg.buffer_rows)
    assert ("loss_mask" in rows.fields) == (kind == "chat")
    trainer = KDSFTTrainer(model=model, args=_sft_config(tmp_path / "trl", steps), train_dataset=rows,
                           processing_class=student.tokenizer, optimizers=(optimizer, scheduler),
                           kd_store=reader, kd_losses=LOSSES, fused_loss=fused)
    assert trainer.kd.fused == fused
    trainer.train()

    assert trainer.kd_sample_ids == [e["sample_ids"] for e in ours]  # the store's rows, in kdcache's order
    for hf, mine in zip(trainer.kd_history, ours, strict=True):
        for key in ("loss", "fkl", "ce"):
            assert hf[key] == pytest.approx(mine[key], rel=1e-5, abs=0), (key, hf, mine)
    assert any("kd/fkl" in entry for entry in trainer.state.log_history)  # through TRL's log()


def test_only_assistant_tokens_are_trained(chat_store, tiny_teacher_dir, tmp_path):
    reader = StoreReader(chat_store)
    student = _student(reader, tiny_teacher_dir)
    rows = StoreRows(reader, kd_fields(reader, LOSSES, student.model), shuffle=False)
    trainer = KDSFTTrainer(model=student.model, args=_sft_config(tmp_path / "trl", 1), train_dataset=rows,
                           processing_class=student.tokenizer, kd_store=reader, kd_losses=LOSSES)
    batch = KDCollator()([row for _, row in zip(range(2), rows, strict=False)])
    counted = fold_loss_mask(batch)["target_mask"]
    assert counted.any() and (~counted & batch["valid"]).any()  # some valid tokens are not the assistant's

    def loss_and_grad(b):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(b))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    loss, grads = loss_and_grad(batch)
    # other teacher signals at the positions that are not counted: the same loss and gradient
    scrambled = dict(batch)
    for name in ("topk_logp", "topk_ids"):
        noise = batch[name][torch.randperm(batch[name].shape[0])].flip(1)
        scrambled[name] = torch.where(counted[..., None], batch[name], noise)
    loss2, grads2 = loss_and_grad(scrambled)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    # the same change at a counted position moves the loss
    moved = dict(batch)
    moved["topk_logp"] = batch["topk_logp"].clone()
    b, t = counted.nonzero()[0].tolist()
    moved["topk_logp"][b, t] = moved["topk_logp"][b, t].flip(0)
    assert not torch.equal(loss_and_grad(moved)[0], loss)


def test_trl_dataset_joined_by_sample_id(plain_store, tiny_teacher_dir, tmp_path):
    from datasets import Dataset

    reader = StoreReader(plain_store)
    ids = [int(i) for i in reader.sample_ids()]
    student = _student(reader, tiny_teacher_dir)
    picked = ids[::2]
    data = Dataset.from_dict({"sample_id": picked, "note": [f"row {i}" for i in picked]})
    trainer = KDSFTTrainer(model=student.model, args=_sft_config(tmp_path / "ok", 2), train_dataset=data,
                           processing_class=student.tokenizer, kd_store=reader, kd_losses=LOSSES)
    trainer.train()
    seen = [i for batch in trainer.kd_sample_ids for i in batch]
    assert len(seen) == 4 and set(seen) <= set(picked)

    bad = Dataset.from_dict({"sample_id": [ids[0], 10**9, ids[1]]})
    with pytest.raises(StoreMismatchError, match=r"^TRL dataset row 1: sample_id 1000000000 is not in store .*\(1 of 3 rows unmatched\)$"):
        KDSFTTrainer(model=student.model, args=_sft_config(tmp_path / "bad", 2), train_dataset=bad,
                     processing_class=student.tokenizer, kd_store=reader, kd_losses=LOSSES)
    other = reader.read_samples(ids[:1], ["input_ids"])["input_ids"][0][::-1].tolist()
    retokenised = Dataset.from_dict({"sample_id": ids[:1], "input_ids": [other]})
    with pytest.raises(StoreMismatchError, match="row 0: input_ids differ"):
        KDSFTTrainer(model=student.model, args=_sft_config(tmp_path / "bad", 2), train_dataset=retokenised,
                     processing_class=student.tokenizer, kd_store=reader, kd_losses=LOSSES)
    with pytest.raises(StoreMismatchError, match="no 'sample_id' column"):
        KDSFTTrainer(model=student.model, args=_sft_config(tmp_path / "bad", 2),
                     train_dataset=Dataset.from_dict({"text": ["hi"]}),
                     processing_class=student.tokenizer, kd_store=reader, kd_losses=LOSSES)


def test_example_script_trains_from_the_example_config(chat_store, tiny_teacher_dir, tmp_path, capsys):
    import importlib.util

    from pipeline.config import ConfigError

    repo = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("trl_sft_from_store", repo / "examples" / "trl_sft_from_store.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = tmp_path / "trl.yaml"
    path.write_text((repo / "configs" / "trl_example.yaml").read_text())
    out = tmp_path / "trl"
    assert example.main([str(path), "--set", f"store={chat_store}", "--set", f"student.teacher={tiny_teacher_dir}",
                         "--set", "student.num_layers=1", "--set", f"sft.output_dir={out}",
                         "--set", "sft.max_steps=2", "--set", "sft.use_cpu=true", "--set", "sft.save_steps=1",
                         "--set", "sft.disable_tqdm=true"]) == 0
    assert "'steps': 2" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file() and (out / "checkpoint-1" / "kd_stream_rank0.json").is_file()
    with pytest.raises(ConfigError, match="sfft"):
        example.run({"store": chat_store, "sfft": {}})
