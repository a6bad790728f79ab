"""StoreRows under Trainer-based trainers: per-rank batch counts, a chat store's mask read by
default, peeking through `hf_dataset()` leaves the rows alone, and a checkpoint without its
stream position is refused before the first step."""

from __future__ import annotations

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from kdstore.reader import StoreReader
from pipeline.config import ConfigError
from pipeline.train.hf_trainer import KDTrainer, kd_fields
from pipeline.train.store_rows import STATE_FILE, StoreRows
from pipeline.train.student import StudentConfig, build_student

LOSSES = [{"name": "fkl"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> str:
    root = tmp_path_factory.mktemp("store_rows")
    return str(cache_short_docs(root / "store", tiny_teacher_dir, write_short_docs(root), split="all"))


def test_rank_loaders_split_the_rows_and_count_their_batches(store):
    rows = StoreRows(store, ["topk_ids"], seed=1)
    n = rows.reader.num_rows()
    assert "loss_mask" not in rows.fields  # a plain store has none
    parts = [list(rows.loader(4, rank=r, world_size=2)) for r in (0, 1)]
    ids = [int(i) for part in parts for batch in part for i in batch["sample_id"]]
    assert sorted(ids) == sorted(int(i) for i in rows.reader.sample_ids()) and len(ids) == n
    loader = rows.loader(4, rank=0, world_size=2)
    assert [len(p) for p in parts] == [loader.batches_per_epoch(0), loader.batches_per_epoch(1)]
    assert len(loader) == len(parts[0])
    single = rows.loader(1, rank=0, world_size=2)
    assert single.batches_per_epoch(0) != single.batches_per_epoch(1)  # 57 rows: 28 and 29 (KDTrainer refuses)
    first = [int(r["sample_id"]) for r in rows.hf_dataset().take(3)]
    assert [int(r["sample_id"]) for r in rows][:3] == first  # the peek did not move the rows


def test_resume_needs_the_stream_position(store, tiny_teacher_dir, tmp_path):
    from transformers import TrainingArguments

    reader = StoreReader(store)
    torch.manual_seed(0)
    model = build_student(StudentConfig(init="teacher_layers", teacher=str(tiny_teacher_dir), num_layers=1),
                          reader, False, "cpu").model
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, save_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = KDTrainer(model=model, args=args, train_dataset=StoreRows(reader, kd_fields(reader, LOSSES, model)),
                        kd_store=reader, kd_losses=LOSSES)
    trainer.train()
    state = tmp_path / "checkpoint-1" / STATE_FILE.format(rank=0)
    assert state.is_file() and '"consumed": {"0": 3}' in state.read_text()
    state.unlink()
    with pytest.raises(ConfigError, match="checkpoint-1' has no stream position 'kd_stream_rank0.json'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
