"""The Hugging Face integration: `KDTrainer` (a transformers.Trainer) takes the same steps as
kdcache's trainer on the same student, batches and loss; `StoreRows` is the store's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from kdstore.reader import StoreReader
from pipeline.train.hf_trainer import KDCollator, KDTrainer, StoreRows, kd_fields
from pipeline.train.losses import LossConfigError, MissingLossFieldError
from pipeline.train.student import StudentConfig, build_student
from pipeline.train.trainer import TrainConfig, lr_factor, make_optimizer, train

LOSSES = [{"name": "fkl"}, {"name": "ce", "weight": 0.5}]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> str:
    root = tmp_path_factory.mktemp("hf_store")
    return str(cache_short_docs(root / "store", tiny_teacher_dir, write_short_docs(root), split="all"))


def _train_cfg(store: str, out: Path, teacher: Path, steps: int) -> TrainConfig:
    return TrainConfig(store=store, out=str(out), student={"init": "teacher_layers", "teacher": str(teacher),
                                                           "num_layers": 1},
                       losses=LOSSES, batch_size=2, steps=steps, lr=1e-3, warmup_steps=2, clip=1.0,
                       device="cpu", tensorboard=False, checkpoint_every=100,
                       fused_loss=False)  # KDTrainer computes whole logits: compare the same arithmetic


@pytest.mark.slow
def test_hf_trainer_takes_the_same_steps_as_ours(store, tiny_teacher_dir, tmp_path):
    from transformers import TrainingArguments

    steps = 5  # 10 rows, batches of 2: one epoch, every batch full in both trainers
    cfg = _train_cfg(store, tmp_path / "ours", tiny_teacher_dir, steps)
    train(cfg, progress=False)
    ours = [json.loads(x) for x in (tmp_path / "ours" / "train_log.jsonl").read_text().splitlines()]

    reader = StoreReader(store)
    torch.manual_seed(cfg.seed)
    student = build_student(StudentConfig(**cfg.student.model_dump()), reader, False, "cpu")
    model = student.model
    optimizer = make_optimizer(list(model.parameters()), cfg)  # the Trainer's AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=2,
                             max_grad_norm=cfg.clip, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0)
    rows = StoreRows(reader, kd_fields(reader, LOSSES, model), seed=cfg.seed, buffer_rows=cfg.buffer_rows)
    trainer = KDTrainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, scheduler),
                        kd_store=reader, kd_losses=LOSSES, fused_loss=False)
    trainer.train()

    assert trainer.kd_sample_ids == [e["sample_ids"] for e in ours]  # the same batches
    for hf, mine in zip(trainer.kd_history, ours, strict=True):
        for key in ("loss", "fkl", "ce"):
            assert hf[key] == pytest.approx(mine[key], rel=1e-5, abs=0), (key, hf, mine)
    assert any("kd/fkl" in entry for entry in trainer.state.log_history)


def test_store_rows_and_collator(store, tiny_teacher_dir):
    reader = StoreReader(store)
    rows = list(StoreRows(reader, ["topk_ids", "topk_logp", "topk_tail"], seed=3, block_rows=3))
    assert len(rows) == reader.num_rows() and len({int(r["sample_id"]) for r in rows}) == len(rows)
    assert rows[0]["topk_ids"].shape == (32, 8) and rows[0]["input_ids"].shape == (32,)
    again = list(StoreRows(reader, ["topk_ids"], seed=3, block_rows=5))  # the order is the stream's, any block size
    assert [int(r["sample_id"]) for r in again] == [int(r["sample_id"]) for r in rows]
    batch = KDCollator()(rows[:3])
    assert batch["topk_logp"].shape == (3, 32, 8) and batch["sample_id"].tolist() == [int(r["sample_id"]) for r in rows[:3]]
    hf_rows = list(StoreRows(reader, ["topk_tail"], seed=3).hf_dataset())
    assert [int(r["sample_id"]) for r in hf_rows] == [int(r["sample_id"]) for r in rows]
    assert torch.equal(KDCollator()(hf_rows[:2])["input_ids"], torch.stack([rows[0]["input_ids"], rows[1]["input_ids"]]))


def test_kd_trainer_checks_fields_and_refuses_what_it_cannot_train(store, tiny_teacher_dir):
    reader = StoreReader(store)
    model = build_student(StudentConfig(teacher=str(tiny_teacher_dir), num_layers=1), reader).model
    with pytest.raises(MissingLossFieldError, match="hidden"):
        kd_fields(reader, [{"name": "hidden"}], model)
    with pytest.raises(LossConfigError, match="kdcache train"):
        kd_fields(reader, [{"name": "fkl"}, {"name": "adversarial", "weight": 0.1, "feature": "output"}], model)


def test_kd_trainer_takes_positional_arguments_and_refuses_model_init(store, tiny_teacher_dir, tmp_path):
    from transformers import TrainingArguments

    from pipeline.config import ConfigError

    reader = StoreReader(store)
    model = build_student(StudentConfig(teacher=str(tiny_teacher_dir), num_layers=1), reader).model
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=1, report_to=[], use_cpu=True)
    trainer = KDTrainer(model, args, kd_store=reader, kd_losses=LOSSES)  # Trainer's own positional order
    assert trainer.model is model and trainer.args is args
    assert isinstance(trainer.train_dataset, StoreRows) and isinstance(trainer.data_collator, KDCollator)
    with pytest.raises(ConfigError, match="needs model=.*model_init"):
        KDTrainer(args=args, model_init=lambda: model, kd_store=reader, kd_losses=LOSSES)


def test_example_script_trains_from_the_example_config(store, tiny_teacher_dir, tmp_path, capsys):
    import importlib.util

    import yaml

    from pipeline.config import ConfigError

    repo = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("hf_trainer_kd", repo / "examples" / "hf_trainer_kd.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = yaml.safe_load((repo / "configs" / "hf_trainer_example.yaml").read_text())
    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "hf"
    assert example.main([str(path), "--set", f"store={store}", "--set", f"student.teacher={tiny_teacher_dir}",
                         "--set", "student.num_layers=1", "--set", f"training.output_dir={out}",
                         "--set", "training.max_steps=2", "--set", "training.use_cpu=true",
                         "--set", "training.disable_tqdm=true"]) == 0
    assert "'steps': 2" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()
    with pytest.raises(ConfigError, match="trainig"):
        example.run({"store": store, "trainig": {}})
    assert example.main([str(path), "--set", "store=/no/such/store"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf_trainer_kd: error:") and "/no/such/store" in err and "\n" not in err
