"""Train a Hugging Face causal LM from a kdcache store with `transformers.Trainer` (KDTrainer).

    .venv/bin/python examples/hf_trainer_kd.py configs/hf_trainer_example.yaml [--set key=value ...]

The config (validated: an unknown key is an error naming it) names the store, the student
(kdcache's `student:` block: a pretrained folder, a random config, or teacher layers; its
tokenizer must be the store's), the kdcache losses (same registry and field checks as
`kdcache train`), and `training:`, any `transformers.TrainingArguments` values. The student and
its tokenizer are saved to `training.output_dir`/model at the end. Everything else is plain
Trainer: callbacks, TRL-style subclasses and Accelerate launchers work as with any Trainer.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from flows.cli import USER_ERRORS, error_line
from kdstore.reader import StoreReader
from pipeline.config import Strict, parse_config, parse_overrides, read_config
from pipeline.train.core import needs_attentions
from pipeline.train.hf_trainer import KDTrainer, StoreRows, kd_fields
from pipeline.train.losses import StoreInfo
from pipeline.train.student import StudentConfig, build_student


class HFKDConfig(Strict):
    store: str
    student: StudentConfig = StudentConfig()
    losses: Any = [{"name": "fkl"}]
    fused_loss: bool = True  # output losses from the last hidden state + head (no whole logits), as kdcache train
    seed: int = 0
    buffer_rows: int = 256
    training: dict[str, Any] = {}  # transformers.TrainingArguments values (output_dir required)


def run(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import TrainingArguments

    cfg = parse_config(config, HFKDConfig, "hf trainer config")
    reader = StoreReader(cfg.store)
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() and not cfg.training.get("use_cpu") else "cpu"
    student = build_student(cfg.student, reader, needs_attentions(cfg.losses, StoreInfo.of(reader)), device)
    args = TrainingArguments(**{"report_to": [], "seed": cfg.seed, **cfg.training})
    rows = StoreRows(reader, kd_fields(reader, cfg.losses, student.model), seed=cfg.seed, buffer_rows=cfg.buffer_rows)
    trainer = KDTrainer(model=student.model, args=args, train_dataset=rows, processing_class=student.tokenizer,
                        kd_store=reader, kd_losses=cfg.losses, fused_loss=cfg.fused_loss)
    result = trainer.train()
    out = Path(args.output_dir) / "model"
    trainer.save_model(str(out))
    return {"out": str(out), "steps": result.global_step, "loss": result.training_loss,
            "last": trainer.kd_history[-1] if trainer.kd_history else {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value, e.g. --set training.max_steps=10")
    ns = parser.parse_args(argv)
    try:
        print(run(read_config(ns.config, parse_overrides(ns.set))))
    except USER_ERRORS as exc:
        print(f"hf_trainer_kd: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
