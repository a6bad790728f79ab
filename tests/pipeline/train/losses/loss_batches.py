"""The loss tests' one batch factory, and the textbook float64 divergences they check against.

A store batch is what `KDStream` yields: `sample_id`, `input_ids`, `valid` and the signal fields.
`topk_signals` computes a top-k store's fields from a dense teacher exactly (the tail is the mass
of the ids not kept, not 1 - Σ kept), `topk_batch` adds the row fields, and `make_case` is the
common case: a dense float64 teacher, its top-k batch and student logits.
"""

from __future__ import annotations

import torch

B, T, V = 2, 5, 64
NAMES = ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]


def valid_mask(b: int, t: int, invalid_tail: int = 0, row: int = 1) -> torch.Tensor:
    """[b, t] all valid but the last `invalid_tail` positions of row `row` (padding)."""
    valid = torch.ones(b, t, dtype=torch.bool)
    if invalid_tail:
        valid[row, -invalid_tail:] = False
    return valid


def topk_signals(teacher_logp: torch.Tensor, k: int, *, top_p: float | None = None, dtype: torch.dtype | None = None,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    """A top-k store's fields of a dense teacher [.., V] (log-probs): the k most likely ids (int32),
    their log-probs (-inf past `top_p`'s nucleus) and the exact mass of every id not kept;
    `prefix` names a joined store's teacher (`t1/`)."""
    vals, ids = teacher_logp.topk(k, dim=-1)
    if top_p is not None:
        before = vals.exp().cumsum(-1) - vals.exp()
        vals = vals.masked_fill(before >= top_p, float("-inf"))
    kept = torch.zeros_like(teacher_logp, dtype=torch.bool).scatter(-1, ids, torch.isfinite(vals))
    tail = teacher_logp.exp().masked_fill(kept, 0).sum(-1)
    dtype = dtype or teacher_logp.dtype
    return {prefix + "topk_ids": ids.to(torch.int32), prefix + "topk_logp": vals.to(dtype),
            prefix + "topk_tail": tail.to(dtype)}


def topk_batch(teacher_logp: torch.Tensor, k: int, *, input_ids: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None,
               invalid_tail: int = 0, top_p: float | None = None, dtype: torch.dtype | None = None,
               **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A top-k store batch of a dense teacher [B, T, V]: row fields (`input_ids` if given) +
    `topk_signals` + `extra` fields."""
    b, t = teacher_logp.shape[:2]
    return {
        "sample_id": torch.arange(b) if sample_ids is None else sample_ids,
        **({} if input_ids is None else {"input_ids": input_ids}),
        "valid": valid_mask(b, t, invalid_tail),
        **topk_signals(teacher_logp, k, top_p=top_p, dtype=dtype),
        **extra,
    }


def make_case(k: int, *, top_p: float | None = None, seed: int = 0, dtype=torch.float64, invalid_tail: int = 2):
    """Teacher log-probs (dense, float64), a top-k batch computed exactly, student logits."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    student = (1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    batch = topk_batch(teacher, k, top_p=top_p, dtype=dtype, invalid_tail=invalid_tail,
                       sample_ids=torch.tensor([10, 11]), input_ids=torch.randint(0, V, (B, T), generator=g))
    return teacher, student, batch


def uniform_draws(batch: dict[str, torch.Tensor], n: int = 4) -> dict[str, torch.Tensor]:
    """`batch` with a sampled store's fields: ids 0..n-1 drawn once each at every position."""
    shape = batch["valid"].shape
    return {
        **batch,
        "draw_ids": torch.arange(n, dtype=torch.int32).expand(*shape, n).contiguous(),
        "draw_counts": torch.ones(*shape, n, dtype=torch.int32),
    }


# ---------------------------------------------------------------- float64 references


def coarsen(dense_p: torch.Tensor, ids: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[.., V] probabilities → [.., k+1]: live kept ids, then the mass of every other id."""
    kept = torch.zeros_like(dense_p, dtype=torch.bool).scatter(-1, ids.long(), live)
    picked = torch.where(live, dense_p.gather(-1, ids.long()), 0.0)
    return torch.cat([picked, torch.where(kept, 0.0, dense_p).sum(-1, keepdim=True)], -1)


def xlogy_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, 1.0)) - torch.log(torch.where(p > 0, q, 1.0))), 0.0).sum(-1)


def reference(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-position divergence between probability vectors, textbook definitions."""
    if name == "fkl":
        return xlogy_kl(p, q)
    if name == "rkl":
        return xlogy_kl(q, p)
    if name == "js":
        m = 0.5 * (p + q)
        return 0.5 * xlogy_kl(p, m) + 0.5 * xlogy_kl(q, m)
    if name == "skl":  # DistiLLM, alpha = 0.1
        return xlogy_kl(p, 0.1 * p + 0.9 * q)
    if name == "srkl":
        return xlogy_kl(q, 0.9 * p + 0.1 * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":  # the authors' get_ratio, on the given buckets
        p_sorted, order = p.sort(-1, descending=True)
        errors = (p_sorted - q.detach().gather(-1, order)).abs()
        tail_mask = p_sorted.cumsum(-1) > 0.5
        tail_mask[..., 0] = False
        g_head = errors.masked_fill(tail_mask, 0).sum(-1)
        g_tail = errors.masked_fill(~tail_mask, 0).sum(-1)
        return g_head / (g_head + g_tail) * xlogy_kl(p, q) + g_tail / (g_head + g_tail) * xlogy_kl(q, p)
    raise AssertionError(name)


def reference_loss(name, teacher, logits, batch, coarse: bool, temperature: float = 1.0):
    """The loss `name` of a batch in float64: mean of `reference` over the valid positions."""
    p = teacher.exp()
    q = torch.softmax(logits.double() / temperature, -1)
    if coarse:
        live = torch.isfinite(batch["topk_logp"])
        p, q = coarsen(p, batch["topk_ids"], live), coarsen(q, batch["topk_ids"], live)
    per = reference(name, p, q)
    mask = batch["valid"]
    return per[mask].mean() if mask.any() else per.sum() * 0


def value_and_grad(loss_fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    value = loss_fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad
