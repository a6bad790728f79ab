"""A causal LM split into its base model and its output head, so the head is applied chunk by chunk.

Why: a causal LM's forward ends with logits = head(last hidden state), a [tokens, V] tensor that
whoever reads it then takes whole. The teacher pass (top-k, draws, log-sum-exp per chunk) and the
student's fused output losses (`pipeline.train.losses.fused`, when every loss of a run is
fusable) run the base model only (`LastHidden`) and apply the head weight per chunk of tokens.
That is exact only for a head that is a plain bias-free linear map of the base model's last
hidden state, so `fusable_head` checks it once per model, numerically, on a few tokens, and says
why not otherwise (the caller then keeps whole logits).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn


class LastHidden(nn.Module):
    """model.get_decoder()(input_ids).last_hidden_state: the base model, final norm included.
    Wraps the whole causal LM (so DDP and compile see, and sync, every parameter)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fusable_head(model: Any, vocab_size: int | None = None) -> str | None:
    """None when logits == last_hidden @ head.T for `model` (checked on 8 tokens, once per
    model), else why not."""
    if model not in _CHECKED:
        _CHECKED[model] = _check(model, vocab_size)
    return _CHECKED[model]


def _check(model: Any, vocab_size: int | None) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "its output head is not a bias-free linear layer"
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if decoder is None or decoder is model:
        return "it has no separate base model (get_decoder)"
    param = next(model.parameters())
    ids = torch.arange(8, device=param.device)[None] % (vocab_size or head.weight.shape[0])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            fused = (LastHidden(model)(ids) @ head.weight.T).float()
    finally:
        model.train(training)
    scale = logits.abs().max().clamp_min(1.0)
    if logits.shape != fused.shape or not bool(((logits - fused).abs().max() / scale) < 1e-3):
        return "its logits are not head(last hidden state) (a scale, soft-cap or extra layer)"
    return None
