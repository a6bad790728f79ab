"""The online-KD baseline: the teacher resident beside the student, its live outputs turned into
the same fields the store would hold, so the same losses train from them.

With `online_full_logits` the distribution losses get the teacher's whole distribution instead
(`TEACHER_LOGP`): the full-logit KD reference that the cache is measured against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from kdstore.spec import StoreSpec
from pipeline.capture.model_head import fusable_head
from pipeline.capture.teacher_pass import chunked_logits, extract_tensors
from pipeline.train.losses.output import TEACHER_LOGP


def online_spec(spec: StoreSpec, loss_fields: Iterable[str]) -> StoreSpec:
    """The store's spec less the signals no loss reads: a resident teacher then computes neither
    hidden states, attention maps (eager attention) nor draws that every step would throw away."""
    read = set(loss_fields)
    uses = {prefix: any(f.startswith(prefix) for f in read) for prefix in ("hidden_", "attn_", "draw_", "tail_")}
    return dataclasses.replace(spec, hidden=spec.hidden if uses["hidden_"] else None,
                               attention=spec.attention if uses["attn_"] else None,
                               sampled=spec.sampled if uses["draw_"] else None,
                               tail_sample=spec.tail_sample if uses["tail_"] else None)


def online_teacher_fields(teacher: Any, spec: StoreSpec, input_ids: torch.Tensor, full_logits: bool) -> dict[str, torch.Tensor]:
    """The fields the store would hold for this batch, left on the teacher's device (no host round
    trip). no_grad, not inference_mode: autograd may save these tensors in the student's backward."""
    model = teacher.model
    # as the teacher pass does: the head per chunk of tokens, unless whole logits are wanted
    chunked = not full_logits and (spec.topk is not None or spec.sampled is not None) and fusable_head(model) is None
    with torch.no_grad():
        result = (model.get_decoder() if chunked else model)(
            input_ids=input_ids.to(teacher.device, non_blocking=True), use_cache=False,
            output_hidden_states=spec.hidden is not None, output_attentions=spec.attention is not None)
        logits = chunked_logits(result.last_hidden_state, model.get_output_embeddings().weight) if chunked else None
        fields = extract_tensors(result, spec, None, logits)
        if full_logits:
            captured = spec.topk.temperature if spec.topk is not None else 1.0
            fields[TEACHER_LOGP] = torch.log_softmax(result.logits.float() / captured, dim=-1)
    return fields
