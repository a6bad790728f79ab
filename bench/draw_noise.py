"""How noisy a sampled target is, per draw scheme and draw count, on the real teacher's outputs.

Sampled KD trains on counts c / N instead of the teacher's distribution p; every scheme here is
unbiased, so what separates them is the noise q̂ - p a step sees. Two measures, both means over
tokens: the target's squared error ‖q̂ - p‖² and the noise it puts into the gradient at the
student's last hidden state, ‖Wᵀ(q̂ - p)‖² (W: the teacher's unembedding, which a pruned student
shares). Schemes: `multinomial` (independent draws), `systematic` (N evenly spaced points through
the CDF in vocabulary order, `pipeline.capture.extract.draw`) and `systematic_sorted` (the same
over the vocabulary sorted by probability: stratifies the tail by size, same marginals). Two
allocations of a byte budget across tokens follow, from the exact systematic error
Σ f(1 - f) / N² (f = frac(N·p)) and expected distinct ids Σ min(1, N·p): `per_token_budget` (each
token the largest N whose expected distinct ids stay ≤ U, U = fixed-N's mean) and `optimal` (each
token the N minimising error + λ·distinct, λ set so the mean distinct ids match fixed N).

    python -m bench.draw_noise [--tokens 512] [--draws 12,24,48] [--repeats 16]

Prints a table and a JSON last line {"rows": [{scheme, n_draws, distinct, target_err, grad_err}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from bench.common import log
from bench.store_signals import ROW, _load_teacher, _text_tokens
from pipeline.capture.extract import draw

SCHEMES = ("multinomial", "systematic", "systematic_sorted")


def estimate(probs: torch.Tensor, n_draws: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """[P, V] probabilities → the sampled target c / N, dense [P, V]."""
    if scheme == "systematic_sorted":
        order = probs.argsort(-1, descending=True)
        ids = order.gather(-1, draw(probs.gather(-1, order), n_draws, generator, "systematic"))
    else:
        ids = draw(probs, n_draws, generator, scheme)
    return torch.zeros_like(probs).scatter_add_(-1, ids, torch.full(ids.shape, 1.0 / n_draws, dtype=probs.dtype))


def sampled_noise(probs: torch.Tensor, unembed: torch.Tensor, n_draws: int, scheme: str, repeats: int, seed: int
                  ) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    target = grad = distinct = 0.0
    for _ in range(repeats):
        err = estimate(probs, n_draws, scheme, generator) - probs
        target += (err**2).sum(-1).mean().item() / repeats
        grad += ((err @ unembed) ** 2).sum(-1).mean().item() / repeats
        distinct += ((err + probs) > 0).sum(-1).double().mean().item() / repeats
    return {"scheme": scheme, "n_draws": n_draws, "distinct": distinct, "target_err": target, "grad_err": grad}


def systematic_tables(probs: torch.Tensor, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact expected distinct ids and target error of systematic draws, [P, n_max] for N = 1..n_max."""
    distinct = np.zeros((probs.shape[0], n_max))
    error = np.zeros((probs.shape[0], n_max))
    for n in range(1, n_max + 1):
        scaled = probs * n
        frac = scaled - scaled.floor()
        distinct[:, n - 1] = scaled.clamp_max(1).sum(-1).numpy()
        error[:, n - 1] = ((frac * (1 - frac)).sum(-1) / n**2).numpy()
    return distinct, error


def allocations(distinct: np.ndarray, error: np.ndarray, n_draws: int) -> list[dict[str, float]]:
    """Per-token draw counts spending fixed-N's mean distinct ids another way (module docstring)."""
    rows = np.arange(len(distinct))
    budget = distinct[:, n_draws - 1].mean()
    allowed = distinct <= budget
    per_token = np.where(allowed.any(1), allowed.shape[1] - 1 - allowed[:, ::-1].argmax(1), 0)
    lo, hi = 1e-7, 1.0  # λ by bisection: larger λ, fewer distinct ids
    for _ in range(40):
        lam = (lo * hi) ** 0.5
        optimal = (error + lam * distinct).argmin(1)
        lo, hi = (lam, hi) if distinct[rows, optimal].mean() > budget else (lo, lam)
    optimal = (error + hi * distinct).argmin(1)
    return [{"scheme": name, "n_draws": float(choice.mean() + 1), "distinct": float(distinct[rows, choice].mean()),
             "target_err": float(error[rows, choice].mean()), "grad_err": None}
            for name, choice in (("per_token_budget", per_token), ("optimal", optimal))]


def teacher_probs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    model, tokenizer, how = _load_teacher()
    ids, note = _text_tokens(tokenizer, tokens)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).reshape(-1, ROW)).logits
    probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    return probs, model.get_output_embeddings().weight.detach().double(), f"{how} over {note}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help=f"teacher positions (a multiple of {ROW})")
    p.add_argument("--draws", default="12,24,48", help="draw counts N, comma-separated")
    p.add_argument("--repeats", type=int, default=16, help="independent draws per scheme and N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    counts = [int(n) for n in args.draws.split(",")]
    if args.tokens < ROW or args.tokens % ROW or not all(1 <= n <= 255 for n in counts):
        sys.exit(f"--tokens must be a positive multiple of {ROW} and --draws in [1, 255], got {args.tokens}, {args.draws}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    probs, unembed, source = teacher_probs(args.tokens)
    log(f"teacher: {source}; {probs.shape[0]} positions, V = {probs.shape[1]:,}")
    rows = [sampled_noise(probs, unembed, n, scheme, args.repeats, args.seed) for n in counts for scheme in SCHEMES]
    distinct, error = systematic_tables(probs, 255)  # the store's cap on draws
    for n in counts:
        rows += [{**row, "budget_of": n} for row in allocations(distinct, error, n)]
    print(f"\n### Sampled-target noise ({probs.shape[0]} teacher positions, {args.repeats} repeats)\n")
    print("| scheme | draws N | distinct ids | ‖q̂ − p‖² | ‖Wᵀ(q̂ − p)‖² |\n|---|---:|---:|---:|---:|")
    for row in rows:
        grad = "–" if row["grad_err"] is None else f"{row['grad_err']:.4f}"
        n = f"{row['n_draws']:.1f} (mean)" if "budget_of" in row else f"{row['n_draws']}"
        print(f"| {row['scheme']} | {n} | {row['distinct']:.2f} | {row['target_err']:.5f} | {grad} |")
    print(json.dumps({"source": source, "positions": probs.shape[0], "repeats": args.repeats, "rows": rows,
                      "wall_s": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
