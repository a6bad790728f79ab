"""Train a chat (or plain) student from a kdcache store with TRL's SFTTrainer (KDSFTTrainer).

    .venv/bin/python examples/trl_sft_from_store.py configs/trl_example.yaml [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 examples/trl_sft_from_store.py configs/trl_example.yaml

The config (validated: an unknown key is an error naming it) names the store, the student
(kdcache's `student:` block; its tokenizer must be the store's), the kdcache losses, and `sft:`,
any `trl.SFTConfig` values. The rows come from the store (already rendered with the chat
template; a chat store's loss_mask picks the assistant's tokens), the loss is kdcache's, and
everything else is TRL's: its config, logging, checkpoints, `resume_from_checkpoint`.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from flows.cli import USER_ERRORS, error_line
from kdstore.reader import StoreReader
from pipeline.config import Strict, parse_config, parse_overrides, read_config
from pipeline.train.core import needs_attentions
from pipeline.train.hf_trainer import StoreRows, kd_fields
from pipeline.train.losses import StoreInfo
from pipeline.train.student import StudentConfig, build_student


class TRLKDConfig(Strict):
    store: str
    student: StudentConfig = StudentConfig()
    losses: Any = [{"name": "fkl"}]
    seed: int = 0
    buffer_rows: int = 256
    resume_from_checkpoint: str | bool | None = None
    sft: dict[str, Any] = {}  # trl.SFTConfig values (output_dir required)


def run(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from trl import SFTConfig

    from pipeline.train.trl_trainer import KDSFTTrainer

    cfg = parse_config(config, TRLKDConfig, "trl config")
    reader = StoreReader(cfg.store)
    torch.manual_seed(cfg.seed)
    args = SFTConfig(**{"report_to": [], "seed": cfg.seed, **cfg.sft})
    device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
    student = build_student(cfg.student, reader, needs_attentions(cfg.losses, StoreInfo.of(reader)), device)
    rows = StoreRows(reader, kd_fields(reader, cfg.losses, student.model), seed=cfg.seed, buffer_rows=cfg.buffer_rows)
    trainer = KDSFTTrainer(model=student.model, args=args, train_dataset=rows, processing_class=student.tokenizer,
                           kd_store=reader, kd_losses=cfg.losses)
    result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    out = Path(args.output_dir) / "model"
    trainer.save_model(str(out))
    return {"out": str(out), "steps": result.global_step, "loss": result.training_loss,
            "last": trainer.kd_history[-1] if trainer.kd_history else {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value, e.g. --set sft.max_steps=10")
    ns = parser.parse_args(argv)
    try:
        print(run(read_config(ns.config, parse_overrides(ns.set))))
    except USER_ERRORS as exc:
        print(f"trl_sft_from_store: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
