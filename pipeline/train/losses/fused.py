"""Output losses fused with the output head: logits chunk by chunk, gradients in the same loop.

Why: the unfused losses take the student's whole logits [tokens, V] (and autograd keeps copies of
them: the log-softmax, the masked tail copy, its saved tensors), so at V = 150k the loss, not the
model, sets the peak memory and most of the step's time goes to elementwise passes over V. Here
(the technique of fused linear cross-entropy kernels) the losses take the student's last hidden
state [N, d] and its output head [V, d]; tokens are processed in chunks, each chunk's logits
exist only inside the loop, and the gradients w.r.t. hidden and head are computed there
analytically, so the backward pass only scales them. Peak memory: one chunk's logits (and a
couple of same-size buffers) plus the head's gradient.

Per chunk and per temperature: ONE softmax pass (max, exp, sum) serves every output loss of the
step (divergences over kept ids + tail, sampled KD, CE, any weighted sum of them). Student tail
(the ids not kept): its mass is summed from the softmax itself over the dropped ids (the kept
entries zeroed in place for the sum, then put back), exact to rounding however close the kept
mass is to 1; only rows where that sum underflows (< TINY_TAIL) take the exact dropped-id
log-sum-exp over the logits. (1 - Σ kept would lose all its digits there.)

Gradients: with s = z / τ, L = logsumexp(s), q = softmax(s), the coarse student log-probs are
ls_j = s_id(j) - L (kept) and ls_tail = log Σ_{i not kept} e^{s_i} - L. For ∂D/∂ls = g (taken by
autograd over the small [n, k+1] bucket tensors, so every divergence of `coarse` is used as
defined there), ∂D/∂s_i = g_tail · q_i / Q_tail · [i not kept] + Σ_j g_j [i = id(j)] - q_i Σ g.
So the V-wide work is one multiply of q by a per-row scalar and a scatter-add of k values.
Sparse cross-entropies (-Σ_j w_j log q(id_j): CE with one label, sampled KD with its draws) give
∂/∂s_i = q_i Σ w - Σ_j w_j [i = id_j].

Per-token weights are plain arguments (`token_weight` [N], 0 = not counted): a mean over the
positions that count is weight 1/count there, and any other mask or weighting folds in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (rows × V): 64 MB in float32, ~110 tokens at V = 151,936
TINY_TAIL = 1e-30  # below this the softmax sum over the dropped ids has lost digits to underflow


@dataclass(frozen=True, eq=False)
class CoarseTerm:
    """A divergence over kept ids + one tail bucket. ids [N, k] (long), teacher log-probs over the
    buckets `lt` [N, k+1] (0 at dead buckets), `live` [N, k+1], `token_weight` [N]."""

    label: str
    weight: float
    divergence: Callable[..., Tensor]
    temperature: float
    ids: Tensor
    lt: Tensor
    live: Tensor
    token_weight: Tensor


@dataclass(frozen=True, eq=False)
class SparseCETerm:
    """-Σ_j w_j log q(id_j) + offset per token: ids [N, m] (long), targets w [N, m] (0 = none),
    `token_weight` [N], `offset` [N] (a constant of the teacher, no gradient; None = 0)."""

    label: str
    weight: float
    temperature: float
    ids: Tensor
    targets: Tensor
    token_weight: Tensor
    offset: Tensor | None = None


Term = CoarseTerm | SparseCETerm


def chunk_rows(vocab_size: int, chunk_elements: int | None = None) -> int:
    """Tokens per chunk: about `chunk_elements` (default CHUNK_ELEMENTS) logits, at least 8 rows."""
    return max(8, (chunk_elements or CHUNK_ELEMENTS) // max(vocab_size, 1))


def fused_output_loss(hidden: Tensor, head: Tensor, terms: Sequence[Term],
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(total = Σ weight · value, values [len(terms)] detached) for hidden [.., d] and head [V, d].

    Each value is Σ_t token_weight[t] · loss(t). Differentiable w.r.t. hidden and head (through the
    total). Under autocast the head matmuls run in the autocast dtype, as the head layer would.
    """
    if not terms:
        raise ValueError("fused_output_loss needs at least one term")
    flat = hidden.reshape(-1, hidden.shape[-1])
    for term in terms:
        if term.token_weight.numel() != flat.shape[0]:
            raise ValueError(f"loss {term.label!r}: {term.token_weight.numel()} token weights for {flat.shape[0]} tokens")
    total, values = _Fused.apply(flat, head, tuple(terms), chunk_size or chunk_rows(head.shape[0]))
    return total, values


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, terms: tuple[Term, ...], chunk: int):  # type: ignore[override]
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        mm_dtype = torch.get_autocast_dtype(device.type) if autocast else torch.promote_types(hidden.dtype, head.dtype)
        cdt = torch.float64 if mm_dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            w = head.to(mm_dtype)
            grad_h = torch.zeros(hidden.shape, dtype=cdt, device=device) if need_h else None
            grad_w = torch.zeros(head.shape, dtype=cdt, device=device) if need_w else None
            values = torch.zeros(len(terms), dtype=cdt, device=device)
            counted = torch.stack([t.token_weight != 0 for t in terms]).any(0)
            rows = counted.nonzero().squeeze(-1)  # tokens no loss counts cost nothing
            groups: dict[float, list[int]] = {}
            for i, term in enumerate(terms):
                groups.setdefault(term.temperature, []).append(i)
            for start in range(0, rows.numel(), chunk):
                idx = rows[start : start + chunk]
                h = hidden.index_select(0, idx).to(mm_dtype)
                z = (h @ w.T).to(cdt)
                gz = None
                for temperature, members in groups.items():
                    gs = _group(z, temperature, [terms[i] for i in members], idx, values, members, need_h or need_w)
                    if gs is not None:
                        gs = gs / temperature if temperature != 1.0 else gs
                        gz = gs if gz is None else gz.add_(gs)
                del z
                if gz is None:
                    continue
                gz = gz.to(mm_dtype)
                if grad_h is not None:
                    grad_h.index_copy_(0, idx, (gz @ w).to(cdt))
                if grad_w is not None and mm_dtype == cdt:
                    grad_w.addmm_(gz.T, h)  # in place: no [V, d] temporary per chunk
                elif grad_w is not None:
                    grad_w += (gz.T @ h).to(cdt)
            weights = torch.tensor([t.weight for t in terms], dtype=cdt, device=device)
            total = (values * weights).sum()
        # kept on ctx (not saved tensors): backward scales them in place, no second [V, d] copy
        ctx.grads = (grad_h.to(hidden.dtype) if grad_h is not None else None,
                     grad_w.to(head.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total: Tensor, grad_values: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the fused output loss's backward runs once (its gradients were computed in the "
                               "forward pass and handed over); recompute the loss to differentiate it again")
        grads, ctx.grads = ctx.grads, None
        # always scaled (× 1 is exact): testing grad_total == 1 on the host would sync the device
        scaled = [g if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return scaled[0], scaled[1], None, None


def _group(z: Tensor, temperature: float, terms: list[Term], idx: Tensor, values: Tensor, slots: list[int],
           want_grad: bool) -> Tensor | None:
    """One softmax pass at one temperature for every term using it: adds their values into
    `values[slots]` and returns ∂(Σ weight · value)/∂s over the chunk (s = z / τ), or None."""
    s = z / temperature if temperature != 1.0 else z
    peak = s.amax(-1, keepdim=True)
    q = (s - peak).exp_()
    norm = q.sum(-1, keepdim=True)
    lse = peak + norm.log()
    q.div_(norm)
    scale = torch.zeros_like(lse)  # per-row multiplier of q in the gradient
    sparse: list[tuple[Tensor, Tensor]] = []  # (ids, values) scatter-added into the gradient
    dense_rows: list[tuple[Tensor, Tensor]] = []  # (rows, [rows, V] gradient): underflowed tails
    for term, slot in zip(terms, slots, strict=True):
        tw = term.token_weight.index_select(0, idx).to(s.dtype)
        ids = term.ids.index_select(0, idx)
        if isinstance(term, SparseCETerm):
            targets = term.targets.index_select(0, idx).to(s.dtype)
            lq = s.gather(-1, ids) - lse
            per = -(targets * lq).sum(-1)
            if term.offset is not None:
                per = per + term.offset.index_select(0, idx).to(s.dtype)
            values[slot] += torch.where(tw != 0, per, 0.0) @ tw
            wt = targets * (tw * term.weight)[:, None]
            scale += wt.sum(-1, keepdim=True)
            sparse.append((ids, -wt))
            continue
        live = term.live.index_select(0, idx)
        lt = term.lt.index_select(0, idx).to(s.dtype)
        kept_live = live[:, :-1]
        q_kept = q.gather(-1, ids)
        # tail mass: the softmax summed over the dropped ids (kept ids zeroed, then put back)
        q.scatter_(-1, ids, torch.where(kept_live, 0.0, q_kept))
        q_tail = q.sum(-1)
        q.scatter_(-1, ids, q_kept)
        ls_kept = s.gather(-1, ids) - lse
        ls_tail = q_tail.clamp_min(torch.finfo(s.dtype).tiny).log()
        under = live[:, -1] & (q_tail < TINY_TAIL)
        rest_rows = under.nonzero().squeeze(-1)
        if rest_rows.numel():
            rest = s.index_select(0, rest_rows).scatter(-1, ids[rest_rows], torch.where(
                kept_live[rest_rows], float("-inf"), ls_kept[rest_rows] + lse[rest_rows]))
            lse_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
            ls_tail = ls_tail.index_copy(0, rest_rows, (lse_rest - lse[rest_rows])[:, 0])
        ls = torch.where(live, torch.cat([ls_kept, ls_tail[:, None]], -1), 0.0)
        with torch.enable_grad():
            leaf = ls.detach().requires_grad_(True)
            per = term.divergence(lt, leaf, live)
            value = torch.where(tw != 0, per, 0.0) @ tw
            (g,) = torch.autograd.grad(value, leaf) if want_grad else (None,)
        values[slot] += value.detach()
        if g is None:
            continue
        g = torch.where(live, g, 0.0) * term.weight
        g_tail = g[:, -1]
        # q_i / Q_tail for dropped ids; rows whose tail underflowed get it densely below
        a = torch.where(under, 0.0, g_tail * (-ls_tail).exp().where(live[:, -1] & ~under, 0.0))
        scale += (a - g.sum(-1))[:, None]
        sparse.append((ids, torch.where(kept_live, g[:, :-1] - a[:, None] * q_kept, 0.0)))
        if rest_rows.numel():
            dense_rows.append((rest_rows, g_tail[rest_rows, None] * (rest - lse_rest).exp()))
    if not want_grad:
        return None
    grad = q.mul_(scale)
    for ids, vals in sparse:
        grad.scatter_add_(-1, ids, vals)
    for rows, dense in dense_rows:
        grad.index_add_(0, rows, dense)
    return grad
