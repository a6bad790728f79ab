"""Teacher signals extracted on the device, from one batch of model outputs.

Everything here is torch on whatever device the teacher runs on; only the compact results
(top-k ids/log-probs, draws, selected layers and heads) travel to the host. The log-softmax is
taken in chunks of tokens, so memory stays bounded for 150k+ vocabularies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TOKEN_CHUNK = 2048
CDF_CHUNK = 128  # tokens per float64 cumulative sum of systematic draws (128 × 152k × 8 B = 156 MB)
SMALL_TAIL = 1e-3  # below this the tail is summed from the dropped ids (exact), above it 1 - Σ kept


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, top_p: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [..., k], log-probs over the full vocabulary [..., k] (sorted), tail mass [...].

    With `top_p`, entries past the first whose cumulative probability reaches top_p become -inf
    (top-p capped at k); the tail then holds everything not kept, so it stays exact.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    ids_out, vals_out, tail_out = [], [], []
    for start in range(0, flat.shape[0], TOKEN_CHUNK):
        chunk = flat[start : start + TOKEN_CHUNK].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        # Two passes over the vocabulary (top-k and log-sum-exp), no [tokens, V] log-softmax copy.
        top, ids = chunk.topk(k, dim=-1, sorted=True)
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        raw = top - lse
        vals = raw
        if top_p is not None:
            before = torch.cumsum(raw.exp(), dim=-1) - raw.exp()
            vals = raw.masked_fill(before >= top_p, float("-inf"))
        tail = (-torch.expm1(torch.logsumexp(vals.double(), dim=-1))).clamp_min(0.0).float()
        small = tail < SMALL_TAIL
        if small.any():
            # 1 - Σ kept loses its digits when the tail is tiny: sum the dropped ids instead.
            rows = small.nonzero().squeeze(-1)
            sub = chunk[rows].scatter(-1, ids[rows], torch.where(torch.isfinite(vals[rows]), float("-inf"), top[rows]))
            tail[rows] = (torch.logsumexp(sub, dim=-1) - lse[rows, 0]).exp()
        ids_out.append(ids)
        vals_out.append(vals)
        tail_out.append(tail)
    shape = logits.shape[:-1]
    return (
        torch.cat(ids_out).reshape(*shape, k),
        torch.cat(vals_out).reshape(*shape, k),
        torch.cat(tail_out).reshape(shape),
    )


def draw(probs: torch.Tensor, n_draws: int, generator: torch.Generator | None, scheme: str) -> torch.Tensor:
    """[N, V] probabilities → [N, n_draws] ids. Either scheme makes count/n_draws an unbiased
    estimate of every probability p. multinomial: independent draws, count variance n·p(1-p).
    systematic: one uniform offset u per row and the points (i + u)/n through the CDF, so every
    count is floor or ceil of n·p (variance at most 1/4): the head is near exact, and the tail
    still gets draws with probability n·p."""
    if scheme == "multinomial":
        return torch.multinomial(probs, n_draws, replacement=True, generator=generator)
    offsets = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    points = (torch.arange(n_draws, device=probs.device, dtype=torch.float64) + offsets) / n_draws
    out = []
    for start in range(0, probs.shape[0], CDF_CHUNK):
        cdf = probs[start : start + CDF_CHUNK].double().cumsum(-1)
        out.append(torch.searchsorted(cdf, points[start : start + CDF_CHUNK] * cdf[:, -1:], right=True))
    return torch.cat(out).clamp_max(probs.shape[-1] - 1)


def sampled_draws(
    logits: torch.Tensor, n_draws: int, temperature: float, generator: torch.Generator | None,
    scheme: str = "multinomial",
) -> tuple[torch.Tensor, torch.Tensor]:
    """n_draws draws per token → unique ids [..., n_draws] and counts (0 = padding, at the end)."""
    flat = logits.reshape(-1, logits.shape[-1])
    ids_out, counts_out = [], []
    for start in range(0, flat.shape[0], TOKEN_CHUNK):
        probs = torch.softmax(flat[start : start + TOKEN_CHUNK].float() / temperature, dim=-1)
        draws = draw(probs, n_draws, generator, scheme)
        ids, counts = unique_counts(draws)
        ids_out.append(ids)
        counts_out.append(counts)
    shape = logits.shape[:-1]
    return torch.cat(ids_out).reshape(*shape, n_draws), torch.cat(counts_out).reshape(*shape, n_draws)


def tail_draws(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, n_draws: int, temperature: float,
    generator: torch.Generator | None, scheme: str = "multinomial",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid's tail: n_draws draws per token from the teacher (at `temperature`) renormalised
    over the ids the head does not keep (kept = finite `topk_logp` slots: top-p padding belongs to
    the tail, as in the stored tail mass) → unique ids [..., n_draws] and counts (0 = padding).
    A token whose tail is empty or has underflowed to zero probability gets no draws."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    ids_flat = topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    kept_flat = torch.isfinite(topk_logp.reshape(-1, topk_logp.shape[-1]))
    ids_out, counts_out = [], []
    for start in range(0, flat.shape[0], TOKEN_CHUNK):
        chunk = flat[start : start + TOKEN_CHUNK].float() / temperature
        ids, kept = ids_flat[start : start + TOKEN_CHUNK], kept_flat[start : start + TOKEN_CHUNK]
        # kept ids get -inf; padding slots write their own logit back (they stay in the tail)
        masked = chunk.scatter(-1, ids, torch.where(kept, float("-inf"), chunk.gather(-1, ids)))
        probs = torch.softmax(masked, dim=-1)
        empty = ~torch.isfinite(probs).all(-1) | (probs.sum(-1) <= 0)
        probs = torch.where(empty[:, None], 1.0 / V, probs)  # any valid row: its draws are dropped below
        uniq, counts = unique_counts(draw(probs, n_draws, generator, scheme))
        counts = torch.where(empty[:, None], 0, counts)
        ids_out.append(torch.where(counts > 0, uniq, 0))
        counts_out.append(counts)
    shape = logits.shape[:-1]
    return torch.cat(ids_out).reshape(*shape, n_draws), torch.cat(counts_out).reshape(*shape, n_draws)


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [N, n] draws: unique ids left-packed (ascending) and their counts."""
    ordered, _ = draws.sort(dim=-1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = new.long().cumsum(dim=-1) - 1
    ids = torch.zeros_like(ordered)
    counts = torch.zeros_like(ordered)
    ids.scatter_(1, slot, ordered)
    counts.scatter_add_(1, slot, torch.ones_like(ordered))
    return ids, counts


def attention_rows(
    attentions: torch.Tensor, heads: Sequence[int], topk: int | None
) -> dict[str, torch.Tensor]:
    """[B, H_all, T, T] attention probabilities → selected heads, dense or top-k per query row."""
    selected = attentions[:, list(heads)].float()
    if topk is None:
        return {"": selected}
    vals, ids = selected.topk(topk, dim=-1)
    return {"_ids": ids, "_p": vals}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy()
