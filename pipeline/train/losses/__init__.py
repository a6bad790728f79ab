"""Losses that train a student from the cached teacher signals (no teacher on the device).

Interface
---------
Every loss is an `nn.Module` (a `KDLoss`)::

    result = loss(StudentOutputs(logits, hidden_states, attentions, output_head), batch)
    result.total.backward()            # scalar, weights applied
    log(result.components)             # {"fkl": ..., "hidden_mse": ...}: detached, unweighted
    check_finite(result, batch)        # NonFiniteLossError naming the component and sample ids

`batch` is a `KDStream` batch (dict of tensors). `loss.fields` lists the store fields it reads
(hand them to `KDStream`), `loss.needs` what it reads from the student ("logits",
"hidden_states", "attentions", "output_head"), and `loss.parameters()` the projections some
losses own (hand them to the optimizer with the student's).

Building::

    loss = build_loss(config, StoreReader(url), StudentDims.from_config(model.config))

`config` is a mapping, a list of mappings (a weighted sum), or the parsed pydantic models (each
loss's config model lives in its file); e.g. in YAML::

    losses:
      - {name: fkl, weight: 0.5, temperature: 1.0}
      - {name: ce, weight: 0.5}
      - {name: hidden, weight: 0.1, metric: cosine, layer_map: [[2, 4], [4, 8]]}

Registry names: fkl, rkl, js, skl, srkl, tvd, akl (top-k stores), sampled_kd (sampled stores),
hybrid_kd (topk_tail_sample stores: exact top-k head + tail draws, see `hybrid`), ce, hidden,
attention, fakd (hidden + attention + output), dskd (dual-space KD), mix, multi_teacher (several
stores joined by sample id: teacher i's fields are `t<i>/<field>`; build it with
`StoreInfo.joined(readers)`), and adversarial (a discriminator with its own optimizer: call
`auxiliary_steps(auxiliary_losses(loss), student, batch)` before the loss each step, and
checkpoint their `aux_state_dict()`; see `base.AuxiliaryStep`), and the cross-tokenizer losses
xtok_align and dskd_cma (a student with its own tokenizer: batches re-tokenised by
`pipeline.train.cross_tokenizer.Retokenizer`, build with `StudentDims(..., tokenizer=...)`).
`build_loss` checks the store's fields first: a missing one is a `MissingLossFieldError` naming
the loss and the field; an unknown name is an `UnknownLossError` listing the known ones.

A loss is one file of this package (found by module discovery below) or of a plugin module: its
config model, store fields, module and builder, registered with `@register_loss`; `LOSSES`
(`registry`) maps every name to its `LossSpec`. See docs/guides/add-a-loss.md.

Conventions
-----------
* Alignment: store signals at t predict token t+1, like HF logits: student logits at t are
  compared with teacher signals at t (where valid[t]); CE labels position t with input_ids[t+1]
  (where valid[t] and valid[t+1]). A chat store's `loss_mask` (per token) is folded by the
  trainer into `target_mask` (per position: loss_mask[t+1], `base.fold_loss_mask`), which
  `kd_mask` and `label_mask` also require, so every loss trains on the assistant's tokens only.
* Reduction: mean over the positions that count (token level); none → exactly 0, zero grads.
* Output distributions: over the kept ids + one tail bucket, exact for that coarsened
  distribution (see `coarse`). `temperature` divides the student logits and must equal the
  store's capture temperature unless `retemper: true` (top-k only; approximate for the tail).
"""

import importlib
import pkgutil

from pipeline.train.losses.base import (
    AuxiliaryStep,
    KDLoss,
    LossConfigError,
    LossResult,
    MissingLossFieldError,
    NonFiniteLossError,
    StudentDims,
    StudentOutputs,
    UnknownLossError,
    auxiliary_losses,
    auxiliary_steps,
    check_finite,
    fold_loss_mask,
    unique_key,
)
from pipeline.train.losses.build import (
    build_loss,
    check_cross_tokenizer,
    check_fields,
    loss_names,
    required_fields,
)
from pipeline.train.losses.mix import WeightedSum
from pipeline.train.losses.registry import (
    LOSSES,
    LossConfig,
    LossSpec,
    import_loss_modules,
    known_names,
    parse_loss_config,
    register_loss,
)
from pipeline.train.losses.store_info import StoreInfo

# module discovery: every module of this package is imported, so a loss file registers itself
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOSSES",
    "AuxiliaryStep",
    "KDLoss",
    "LossConfig",
    "LossConfigError",
    "LossResult",
    "LossSpec",
    "MissingLossFieldError",
    "NonFiniteLossError",
    "StoreInfo",
    "StudentDims",
    "StudentOutputs",
    "UnknownLossError",
    "WeightedSum",
    "auxiliary_losses",
    "auxiliary_steps",
    "build_loss",
    "check_cross_tokenizer",
    "check_fields",
    "check_finite",
    "fold_loss_mask",
    "import_loss_modules",
    "known_names",
    "loss_names",
    "parse_loss_config",
    "register_loss",
    "required_fields",
    "unique_key",
]
