"""Run under `accelerate launch` by test_accelerate_store_rows.py: KDTrainer and KDSFTTrainer on a
store, each rank recording the sample ids of every step; rank 0 saves the final weights."""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from trl import SFTConfig

from kdstore.reader import StoreReader
from pipeline.config import ConfigError
from pipeline.train.hf_trainer import KDTrainer, StoreRows, kd_fields
from pipeline.train.student import StudentConfig, build_student
from pipeline.train.trl_trainer import KDSFTTrainer

LOSSES = [{"name": "fkl"}, {"name": "ce", "weight": 0.5}]


def recording(base: type) -> type:
    class Recording(base):
        def training_step(self, model, inputs, *args, **kwargs):
            self.seen_ids.append([int(i) for i in inputs["sample_id"]])
            return super().training_step(model, inputs, *args, **kwargs)

    return Recording


def run(kind: str, ns: argparse.Namespace) -> None:
    reader = StoreReader(ns.store)
    torch.manual_seed(0)
    student = build_student(StudentConfig(init="teacher_layers", teacher=ns.teacher, num_layers=1), reader, False, "cpu")
    out = Path(ns.out) / kind
    values = dict(output_dir=str(out), max_steps=ns.steps, per_device_train_batch_size=10, learning_rate=1e-3,
                  save_strategy="steps", save_steps=ns.save_steps, logging_steps=1, report_to=[], use_cpu=True,
                  seed=0, disable_tqdm=True, dataloader_num_workers=0)
    args = (TrainingArguments(**values) if kind == "hf"
            else SFTConfig(**values, bf16=False, gradient_checkpointing=False))
    rows = StoreRows(reader, kd_fields(reader, LOSSES, student.model), seed=0, buffer_rows=4)
    cls = recording(KDTrainer if kind == "hf" else KDSFTTrainer)
    trainer = cls(model=student.model, args=args, train_dataset=rows, processing_class=student.tokenizer,
                  kd_store=reader, kd_losses=LOSSES)
    trainer.seen_ids = []
    if kind == "hf" and not ns.resume:  # 1 row per batch: 28 and 29 batches per rank, refused
        trainer.args.per_device_train_batch_size = 1
        try:
            trainer.get_train_dataloader()
        except ConfigError as exc:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"unequal_rank{trainer.args.process_index}.txt").write_text(str(exc))
        trainer.args.per_device_train_batch_size = 10
    trainer.train(resume_from_checkpoint=str(out / ns.resume) if ns.resume else None)
    rank = trainer.args.process_index
    tag = ns.resume or "straight"
    (out / f"ids_{tag}_rank{rank}.json").write_text(json.dumps(trainer.seen_ids))
    if rank == 0:
        weights = {k: v.detach().clone().contiguous() for k, v in student.model.state_dict().items()}
        save_file(weights, str(out / f"weights_{tag}.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("store", "teacher", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--resume", default="")
    ns = parser.parse_args()
    for kind in ("hf", "trl"):
        run(kind, ns)


if __name__ == "__main__":
    main()
