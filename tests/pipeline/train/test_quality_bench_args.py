"""`bench/quality.py --variant NAME:BASE:JSON`: a sweep point is the base method with its first
loss's config merged; bad ones are refused with one line before any method trains."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"


def _quality():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_merges_into_the_base_loss_and_refuses_bad_ones():
    quality = _quality()
    table = quality.methods(quality.PRESETS["cpu"])
    name, base, params = quality.parse_variant('warm:cross_tokenizer_cma:{"projector_warmup_steps": 52}', table)
    assert (name, base, params) == ("warm", "cross_tokenizer_cma", {"projector_warmup_steps": 52})
    for bad, says in [('x:cross_tokenizer_cma:{"projector_warmup_stepz": 5}', "unknown key"),
                      ("x:nope:{}", "BASE one of"), ("ce:topk64:{}", "NEW_NAME"), ("x:ce:{bad", "does not parse")]:
        with pytest.raises(SystemExit, match=says):
            quality.parse_variant(bad, table)
