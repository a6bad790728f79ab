"""Divergences over the kept ids plus one tail bucket: exact for the coarsened distribution.

A top-k store keeps, per position, k teacher log-probs normalised over the FULL vocabulary and
the exact tail mass 1 - Σ kept. Both distributions are coarsened onto the same C = k + 1
buckets (the kept ids, then one bucket for every other id) and the divergence is computed
exactly between the coarsened distributions; with k = V (nothing left over) it is the dense
divergence.

Student side: log-softmax of logits / τ gathered at the kept ids; its tail is the log-sum-exp of
the logits of every id NOT kept (minus the normaliser). That is exact however close the kept
mass is to 1, unlike log1p(-exp(logsumexp(kept))), which cancels to log(0) once the tail falls
below float32 precision. It costs one masked copy of the logits.

Teacher side: kept log-probs (slots with -inf, the padding of top-p rows, are not kept: their
ids belong to the tail, as they do in the stored tail mass) and log(tail). The coarsened vector is
renormalised over its buckets, which is a no-op up to rounding for float32 stores and turns
quantised log-probs back into a proper distribution. A stored tail of exactly 0 while ids are left
over (float32 underflow) is floored at TAIL_FLOOR so reverse divergences stay finite.

Temperature τ divides the student logits. The cache holds the teacher at its capture temperature
τc (store.json). When τ = τc the stored teacher is used as is. Otherwise `retemper` raises the
coarsened teacher to the power τc/τ and renormalises over the buckets: exact for the kept ids'
ratios, approximate for the tail (Σ p_i^a ≠ (Σ p_i)^a), so it is opt-in.

Conventions: `live` [.., C] marks buckets that exist (kept, non-padding ids; the tail when ids
are left over; nothing at masked positions). Dead buckets hold log-prob 0 and probability 0, so
every term is finite and dead buckets give zero gradients (no 0 * inf anywhere).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

TAIL_FLOOR = 1e-30


# ---------------------------------------------------------------- coarsening


def coarse_live(topk_logp: Tensor, mask: Tensor, vocab_size: int) -> Tensor:
    """[.., k+1] buckets that exist: finite kept slots, then the tail when ids are left over.

    Assumes the kept ids of a row are distinct (as top-k produces).
    """
    kept = torch.isfinite(topk_logp) & mask[..., None]
    tail = (kept.sum(-1) < vocab_size) & mask
    return torch.cat([kept, tail[..., None]], dim=-1)


def teacher_coarse(topk_logp: Tensor, topk_tail: Tensor, live: Tensor, dtype: torch.dtype) -> Tensor:
    """Teacher log-probs over the buckets [.., k+1] (renormalised; 0 at dead buckets)."""
    tail = torch.log(topk_tail.to(dtype).clamp_min(TAIL_FLOOR))
    lp = torch.cat([topk_logp.to(dtype), tail[..., None]], dim=-1)
    return renormalise(lp, live)


def renormalise(lp: Tensor, live: Tensor) -> Tensor:
    """Log-probs normalised over the live buckets; 0 at dead ones (and at rows with none)."""
    lp = torch.where(live, lp, float("-inf"))
    norm = torch.logsumexp(lp, dim=-1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, 0.0)
    return torch.where(live, lp - norm, 0.0)


def retemper(lp: Tensor, live: Tensor, power: float) -> Tensor:
    """p^power renormalised over the buckets (the tail is raised as ONE bucket: approximate)."""
    if power == 1.0:
        return lp
    return renormalise(lp * power, live)


def student_coarse(logits: Tensor, topk_ids: Tensor, live: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """Student log-probs over the buckets [.., k+1]: kept ids, then all other ids (0 where dead)."""
    s = logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
    ids = topk_ids.long()
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    picked = s.gather(-1, ids)
    kept_live = live[..., :-1]
    # The not-kept logits: live kept ids are overwritten with the dtype's lowest finite value
    # (finite, so a row with nothing left gives a finite log-sum-exp and no NaN gradient);
    # padding slots write their own value back, staying in the tail.
    floor = torch.finfo(dtype).min
    rest = s.scatter(-1, ids, torch.where(kept_live, floor, picked))
    tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    lp = torch.cat([picked, tail], dim=-1) - lse
    return torch.where(live, lp, 0.0)


def dense_log_probs(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    s = logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
    return torch.log_softmax(s, dim=-1)


# ---------------------------------------------------------------- divergences
#
# Each takes teacher and student log-probs over the same buckets [.., C] and `live` (None = all
# buckets live) and returns the per-position divergence [..].


def _probs(lp: Tensor, live: Tensor | None) -> Tensor:
    p = lp.exp()
    return p if live is None else torch.where(live, p, 0.0)


def _mix_log(lp_a: Tensor, lp_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) from log a and log b."""
    log_w = math.log(weight_a) if weight_a > 0 else float("-inf")
    log_1w = math.log1p(-weight_a) if weight_a < 1 else float("-inf")
    return torch.logaddexp(lp_a + log_w, lp_b + log_1w)


def fkl(lt: Tensor, ls: Tensor, live: Tensor | None) -> Tensor:
    """KL(p_teacher ‖ q_student) = Σ p (log p - log q)."""
    return (_probs(lt, live) * (lt - ls)).sum(-1)


def rkl(lt: Tensor, ls: Tensor, live: Tensor | None) -> Tensor:
    """KL(q_student ‖ p_teacher) = Σ q (log q - log p)."""
    return (_probs(ls, live) * (ls - lt)).sum(-1)


def js(lt: Tensor, ls: Tensor, live: Tensor | None, beta: float = 0.5) -> Tensor:
    """Generalised Jensen–Shannon: β KL(p ‖ m) + (1-β) KL(q ‖ m), m = β p + (1-β) q (β=½: JS)."""
    lm = _mix_log(lt, ls, beta)
    return beta * (_probs(lt, live) * (lt - lm)).sum(-1) + (1 - beta) * (_probs(ls, live) * (ls - lm)).sum(-1)


def skl(lt: Tensor, ls: Tensor, live: Tensor | None, alpha: float = 0.1) -> Tensor:
    """Skewed forward KL (DistiLLM, arXiv 2402.03898): KL(p ‖ α p + (1-α) q)."""
    return (_probs(lt, live) * (lt - _mix_log(lt, ls, alpha))).sum(-1)


def srkl(lt: Tensor, ls: Tensor, live: Tensor | None, alpha: float = 0.1) -> Tensor:
    """Skewed reverse KL (DistiLLM, arXiv 2402.03898): KL(q ‖ (1-α) p + α q)."""
    return (_probs(ls, live) * (ls - _mix_log(lt, ls, 1 - alpha))).sum(-1)


def tvd(lt: Tensor, ls: Tensor, live: Tensor | None) -> Tensor:
    """Total variation distance: ½ Σ |p - q|."""
    return 0.5 * (_probs(lt, live) - _probs(ls, live)).abs().sum(-1)


def akl(lt: Tensor, ls: Tensor, live: Tensor | None, mu: float = 0.5) -> Tensor:
    """Adaptive KL (arXiv 2404.02657): g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL.

    Buckets sorted by teacher probability; the head is the leading buckets whose cumulative teacher
    mass is ≤ μ (always at least the first); g = Σ |p - q| over the head / the rest, with the
    student's probabilities detached (as in the authors' code). p == q everywhere gives ½/½.
    """
    p = _probs(lt, live)
    q = _probs(ls, live).detach()
    p_sorted, order = p.sort(dim=-1, descending=True)
    errors = (p_sorted - q.gather(-1, order)).abs()
    head = torch.cumsum(p_sorted, dim=-1) <= mu
    head[..., 0] = True
    g_head = torch.where(head, errors, 0.0).sum(-1)
    g_tail = torch.where(head, 0.0, errors).sum(-1)
    denom = g_head + g_tail
    w_head = torch.where(denom > 0, g_head / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.5)
    return w_head * fkl(lt, ls, live) + (1 - w_head) * rkl(lt, ls, live)


Divergence = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "js": js,
    "skl": skl,
    "srkl": srkl,
    "tvd": tvd,
    "akl": akl,
}
DIVERGENCE_PARAMS: dict[str, str | None] = {
    "fkl": None,
    "rkl": None,
    "js": "beta",
    "skl": "alpha",
    "srkl": "alpha",
    "tvd": None,
    "akl": "mu",
}


def divergence(name: str, param: float | None = None) -> Divergence:
    """The divergence `name` with its parameter bound (alpha, beta or mu; None = default)."""
    fn = DIVERGENCES[name]
    key = DIVERGENCE_PARAMS[name]
    if key is None or param is None:
        return fn
    return functools.partial(fn, **{key: param})
