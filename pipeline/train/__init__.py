"""Train: store → student. The student builder, the trainer, the loss registry (`losses/`),
cross-tokenizer alignment and the plans of self-distillation rounds.

Uses `pipeline.capture`'s public functions (the teacher and its store files); never imports
`pipeline.evaluation` (a round's scoring, which needs it, runs in
`pipeline.evaluation.self_distill_rounds`).
"""
