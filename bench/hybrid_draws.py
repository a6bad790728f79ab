"""Fixed vs rotated tail draws over epochs: what reusing a cache's sampled draws costs the hybrid.

A cache is read for several epochs, so the hybrid's tail draws (`topk_tail_sample`) are the same
every epoch: a fixed noisy target, not the unbiased one each fresh draw gives. With more draws
stored than a step uses (`hybrid_kd` `draws_per_step`), each epoch reads another window of them.

Experiment (test-sized, CPU, seconds): a teacher of P positions over V ids (Gaussian logits, scale
2.5), a student of free logits (one row per position, zero init), one plain-SGD step per position
per epoch for E epochs. Targets: `exact` (dense forward KL, the reference), `coarse` (top-k + one
tail bucket, no draws), `hybrid` with m draws per step from N stored (N = m: fixed; N > m: rotated
windows), and `fresh` (new draws every epoch: what an unlimited store would give). Reported, over
seeds (teacher and draws): the final dense KL(p ‖ q), its excess over `exact` (the cost), and the
std over seeds of that excess (the noise that a single run sees).

    python -m bench.hybrid_draws [--epochs 32] [--seeds 10]

Prints a table and a JSON last line {method: {"kl", "excess", "excess_std"}, ...}.
"""

from __future__ import annotations

import argparse
import json

import torch

from pipeline.capture.extract import tail_draws
from pipeline.train.losses import StudentOutputs
from pipeline.train.losses.coarse import fkl
from pipeline.train.losses.hybrid import HybridKDLoss
from pipeline.train.losses.output import DistributionLoss


def _batch(teacher: torch.Tensor, k: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    logp, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    t_ids, t_counts = tail_draws(teacher, ids, logp, n, 1.0, torch.Generator().manual_seed(seed))
    P = teacher.shape[1]
    return {"sample_id": torch.zeros(1, dtype=torch.long), "topk_ids": ids, "topk_logp": logp,
            "topk_tail": (1 - logp.exp().sum(-1)).clamp_min(0), "tail_ids": t_ids, "tail_counts": t_counts,
            "valid": torch.ones(1, P, dtype=torch.bool)}


def run(method: str, teacher: torch.Tensor, k: int, m: int, stored: int, epochs: int, lr: float, seed: int) -> float:
    student = torch.zeros_like(teacher, requires_grad=True)
    dense_t = torch.log_softmax(teacher, -1)
    coarse = DistributionLoss("fkl")
    batch = _batch(teacher, k, max(stored, 1), seed)
    hybrid = HybridKDLoss(max(stored, 1), draws_per_step=m)
    P = teacher.shape[1]
    for epoch in range(epochs):
        if method == "exact":
            loss = fkl(dense_t, torch.log_softmax(student, -1), None).sum()
        elif method == "coarse":
            loss = coarse(StudentOutputs(student), batch).total * P
        elif method == "fresh":
            fresh = _batch(teacher, k, m, seed * 100_003 + epoch)
            loss = HybridKDLoss(m)(StudentOutputs(student), fresh).total * P
        else:
            loss = hybrid(StudentOutputs(student), {**batch, "epoch": torch.tensor(epoch)}).total * P
        (grad,) = torch.autograd.grad(loss, student)
        with torch.no_grad():
            student -= lr * grad
    with torch.no_grad():
        return float(fkl(dense_t, torch.log_softmax(student, -1), None).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--draws", type=int, default=8, help="draws per step (m)")
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    m = args.draws
    methods = [("exact", 0), ("coarse", 0), (f"hybrid fixed (N={m})", m)]
    methods += [(f"hybrid rotated (N={n})", n) for n in (2 * m, 4 * m, 8 * m) if n <= 255]
    methods += [("fresh draws each epoch", m)]
    finals: dict[str, list[float]] = {name: [] for name, _ in methods}
    for seed in range(args.seeds):
        teacher = torch.randn(1, args.positions, args.vocab, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64) * 2.5
        for name, stored in methods:
            kind = name.split()[0] if name.split()[0] in ("exact", "coarse") else ("fresh" if name.startswith("fresh") else "hybrid")
            finals[name].append(run(kind, teacher, args.k, m, stored, args.epochs, args.lr, seed))
    exact = torch.tensor(finals["exact"])
    result = {}
    print(f"## Tail draws over {args.epochs} epochs: V={args.vocab}, k={args.k}, m={m} draws/step, "
          f"{args.positions} positions, {args.seeds} seeds, SGD lr {args.lr}\n")
    print("| target | final KL(p‖q) nats | excess over exact | excess std over seeds |")
    print("|---|---:|---:|---:|")
    for name, _ in methods:
        kl = torch.tensor(finals[name])
        excess = kl - exact
        result[name] = {"kl": round(float(kl.mean()), 5), "excess": round(float(excess.mean()), 5),
                        "excess_std": round(float(excess.std()), 5)}
        print(f"| {name} | {kl.mean():.4f} | {excess.mean():+.4f} | {excess.std():.4f} |")
    print("\nN stored draws, m used per epoch: rotated windows are disjoint for the first N/m epochs, then repeat.")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
