"""Fixtures for the kdstore tests: realistic random shard rows for any StoreSpec.

`make_rows(spec, n_rows, first_id=0, seed=0)` returns the arrays a shard takes (see the
docstring of kdstore/fields.py), built the way a teacher pass builds them:

- top-k log-probs normalised over the *full* vocabulary (from random logits at the spec's
  temperature), sorted descending, with the exact tail 1 - sum(exp(kept)); `topp_k` keeps the
  smallest prefix reaching top_p (capped at k) and pads the rest with -inf;
- sampled draws: n_draws categorical draws per token, stored as unique ids with counts > 0
  packed at the front and count-0 padding at the end (counts sum to n_draws);
- hidden states; causal attention rows that are real probability distributions;
- a valid mask with padding at the end of some rows.

The helpers are plain functions (fixtures hand them out) so a subprocess can load this file
with importlib and build the very same rows.
"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest

from kdstore.fields import attention_field, hidden_field
from kdstore.spec import (
    AttentionSpec,
    HiddenSpec,
    Provenance,
    SampledSpec,
    StoreSpec,
    TopKSpec,
)

PROVENANCE = Provenance(
    teacher={"name": "tiny-random", "revision": "0", "weights_sha256": "ab" * 32},
    corpus={"source": "unit-test"},
    packing={"row_length": "spec"},
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def full_spec(**overrides) -> StoreSpec:
    """A spec with every signal kind; keyword overrides replace top-level fields."""
    base = dict(
        vocab_size=256,
        row_length=8,
        shard_rows=4,
        topk=TopKSpec(k=5),
        sampled=SampledSpec(n_draws=12),
        hidden=HiddenSpec(layers=(0, 2), width=16),
        attention=AttentionSpec(layers=(1,), heads=(0, 3)),
        record_batch_rows=3,
        text=True,
    )
    base.update(overrides)
    return StoreSpec(**base)


def make_rows(spec: StoreSpec, n_rows: int, first_id: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    R, T, V = n_rows, spec.row_length, spec.vocab_size
    rows: dict[str, np.ndarray] = {
        "sample_id": np.arange(first_id, first_id + R, dtype=np.int64),
        "input_ids": rng.integers(0, V, size=(R, T), dtype=np.int64),
        # document boundaries: a non-decreasing document index per token
        "doc_ids": np.cumsum(rng.random((R, T)) < 0.2, axis=1, dtype=np.int32) + 7,
    }
    lengths = rng.integers(1, T + 1, size=R)
    lengths[0] = max(1, T - 2)  # at least one row with padding
    rows["valid"] = np.arange(T)[None, :] < lengths[:, None]
    if spec.topk is not None or spec.sampled is not None:
        temperature = (spec.topk or spec.sampled).temperature
        logits = rng.standard_normal((R, T, V)) * 3.0
        logp = log_softmax(logits / temperature)  # float64, over the full vocabulary
        if spec.topk is not None:
            rows.update(_topk(spec.topk, logp))
        if spec.sampled is not None:
            rows.update(_draws(spec.sampled.n_draws, logp, rng))
    if spec.text:  # pieces of 0-3 characters (some outside the BMP), ends relative to the row's text
        alphabet = list("ab c\né日\U0001F600")
        pieces = rng.integers(0, 4, size=(R, T))
        rows["char_end"] = np.cumsum(pieces, axis=1).astype(np.int32)
        rows["text"] = np.array(["".join(rng.choice(alphabet, size=int(n))) for n in pieces.sum(axis=1)], dtype=object)
    if spec.hidden is not None:
        for layer in spec.hidden.layers:
            x = rng.standard_normal((R, T, spec.hidden.width)) * (1.0 + layer)
            rows[hidden_field(layer)] = x.astype(np.float32)
    if spec.attention is not None:
        a = spec.attention
        for layer in a.layers:
            p = causal_attention(rng, R, len(a.heads), T)
            name = attention_field(layer)
            if a.topk is None:
                rows[name] = p
            else:
                ids = np.argsort(-p, axis=-1, kind="stable")[..., : a.topk]
                rows[f"{name}_ids"] = ids.astype(np.int64)
                rows[f"{name}_p"] = np.take_along_axis(p, ids, axis=-1)
    return rows


def _topk(t: TopKSpec, logp: np.ndarray) -> dict[str, np.ndarray]:
    k = t.k
    part = np.argpartition(-logp, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logp, part, axis=-1), axis=-1, kind="stable")
    ids = np.take_along_axis(part, order, axis=-1)
    values = np.take_along_axis(logp, ids, axis=-1)
    if t.sampler == "topp_k":
        # smallest prefix whose mass reaches top_p, capped at k; the rest is -inf padding
        before = np.cumsum(np.exp(values), axis=-1) - np.exp(values)
        keep = before < t.top_p
        values = np.where(keep, values, -np.inf)
        ids = np.where(keep, ids, 0)
    kept = np.exp(values).sum(axis=-1)
    return {
        "topk_ids": ids.astype(np.int64),
        "topk_logp": values.astype(np.float32),
        "topk_tail": np.clip(1.0 - kept, 0.0, 1.0).astype(np.float32),
    }


def _draws(n_draws: int, logp: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    R, T, V = logp.shape
    probs = np.exp(logp)
    ids = np.zeros((R, T, n_draws), dtype=np.int64)
    counts = np.zeros((R, T, n_draws), dtype=np.int64)
    for r, t in itertools.product(range(R), range(T)):
        p = probs[r, t] / probs[r, t].sum()
        drawn = rng.choice(V, size=n_draws, p=p)
        uniq, cnt = np.unique(drawn, return_counts=True)
        ids[r, t, : len(uniq)] = uniq
        counts[r, t, : len(uniq)] = cnt
    return {"draw_ids": ids, "draw_counts": counts}


def causal_attention(rng: np.random.Generator, R: int, H: int, T: int) -> np.ndarray:
    scores = rng.standard_normal((R, H, T, T)) * 2.0
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores[..., future] = -np.inf
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def rows_for():
    """`rows_for(spec, n_rows, first_id=0, seed=0)`: realistic random rows for one shard."""
    return make_rows


@pytest.fixture(scope="session")
def spec_with():
    """`spec_with(**overrides)`: a spec with every signal kind."""
    return full_spec


@pytest.fixture(scope="session")
def provenance() -> Provenance:
    return PROVENANCE


@pytest.fixture(scope="session")
def conftest_path() -> str:
    """This file, for subprocesses that load it with importlib (it is not importable by name:
    every test directory has a module called `conftest`)."""
    return __file__


@pytest.fixture
def memory_url():
    """A fresh memory:// store URL, removed afterwards (the memory filesystem is global)."""
    import fsspec

    url = f"memory://kdstore-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    if fs.exists(root):
        fs.rm(root, recursive=True)
