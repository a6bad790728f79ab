"""`python -m bench.quality_frontier`: joins quality.json files by method, keeps each figure's split,
marks the frontier and judges the byte targets on test only."""

from __future__ import annotations

import json

import pytest
from test_store_fields_bench import write_store

from bench import quality_frontier, store_fields


def quality_json(path, ppl, val, bpt, sweeps, stores, paths=None):
    data = {"preset": "cpu", "seed": 0, "steps": 210, "device": "cpu (2 threads)", "ppl": ppl, "sweeps": sweeps,
            "validation": {"ppl": val}, "bytes_per_token": bpt, "recipes": {m: [{"name": "sampled_kd"}] for m in bpt},
            "stores": {m: {"path": (paths or {}).get(m, f"/s/{m}"), "signals": s, "files": FILES[m[0]]}
                       for m, s in stores.items()}}
    path.write_text(json.dumps(data))
    return path


FILES = {"s": ["tokens", "draws"], "h": ["tokens", "topk_", "tail_draws"], "o": ["tokens"]}
SAMPLED = {"topk": None, "sampled": {"n_draws": 6, "scheme": "systematic"}}
HYBRID = {"topk": {"k": 8}, "tail_sample": {"n_draws": 8}}


def test_frontier_joins_runs_keeps_splits_and_judges_targets_on_test(tmp_path, capsys):
    online = quality_json(tmp_path / "a.json", {"online_full": 60.0}, {"online_full": 50.0}, {"online_full": 1.8},
                          [], {"online_full": {"topk": {"k": 64}}})
    sweep = quality_json(tmp_path / "b.json", {}, {"s4": 53.0, "s6": 49.0, "s12": 49.5, "h8": 50.5},
                         {"s4": 6.0, "s6": 7.5, "s12": 15.8, "h8": 30.0}, ["s4", "s6", "s12", "h8"],
                         {"s4": SAMPLED, "s6": SAMPLED, "s12": SAMPLED, "h8": HYBRID})
    chosen = quality_json(tmp_path / "c.json", {"s6": 59.4}, {"s6": 49.0}, {"s6": 7.5}, [], {"s6": SAMPLED})
    png = tmp_path / "f.png"
    assert quality_frontier.main([str(online), str(sweep), str(chosen), "--out", str(tmp_path / "o"), "--png", str(png)]) == 0
    result = json.loads((tmp_path / "o" / "quality_frontier.json").read_text())
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    points = {p["name"]: p for p in result["points"]}
    assert [p["name"] for p in result["points"]] == ["s4", "s6", "s12", "h8"]  # by bytes
    assert points["s6"]["vs_online_test"] == 0.99 and points["s6"]["vs_online_validation"] == 0.98
    assert points["s6"]["splits"] == {"validation_ppl": "validation", "test_ppl": "test"} and not points["s6"]["sweep_point"]
    assert points["s4"]["test_ppl"] is None and points["s4"]["splits"]["test_ppl"] is None
    assert [n for n, p in points.items() if p["on_frontier"]] == ["s4", "s6"]
    assert points["h8"]["kind"] == "hybrid" and points["s12"]["kind"] == "sampled"
    assert quality_frontier.store_kind({"signals": SAMPLED}) == "sampled"  # no `files`: from the signals
    assert quality_frontier.store_kind({"signals": HYBRID}) == "hybrid" and quality_frontier.store_kind({}) is None
    assert quality_frontier.store_kind({"files": ["tokens"]}) is None
    assert result["targets"]["sampled_at_8_B"]["verdict"] == "met" and result["targets"]["sampled_at_8_B"]["point"] == "s6"
    assert result["targets"]["hybrid_at_32_B"]["verdict"] == "not scored on test"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_frontier_refuses_runs_without_the_reference_or_from_other_presets(tmp_path):
    sweep = quality_json(tmp_path / "b.json", {}, {"s4": 53.0}, {"s4": 6.0}, ["s4"], {"s4": SAMPLED})
    with pytest.raises(SystemExit, match="no run has 'online_full'"):
        quality_frontier.main([str(sweep), "--out", str(tmp_path)])
    other = json.loads(sweep.read_text()) | {"preset": "quick", "validation": {"ppl": {"online_full": 5.0}}}
    (tmp_path / "q.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in preset"):
        quality_frontier.main([str(sweep), str(tmp_path / "q.json"), "--out", str(tmp_path)])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not a readable quality.json"):
        quality_frontier.main([str(tmp_path / "bad.json")])


def test_frontier_rewrites_each_store_at_another_layout(tmp_path, capsys):
    """--rewrite: a point's bytes become those of its store's files re-written (lossless) at the
    given shard size and zstd level; the bench's own figure stays beside; a missing store keeps it."""
    sum(write_store(tmp_path / "store"))
    online = quality_json(tmp_path / "a.json", {"online_full": 60.0}, {"online_full": 50.0}, {"online_full": 1.8},
                          [], {"online_full": {"topk": {"k": 64}}})
    sweep = quality_json(tmp_path / "b.json", {}, {"s4": 53.0, "s6": 49.0}, {"s4": 60.0, "s6": 7.5}, ["s4", "s6"],
                         {"s4": SAMPLED, "s6": SAMPLED}, paths={"s4": str(tmp_path / "store")})
    assert quality_frontier.main([str(online), str(sweep), "--out", str(tmp_path / "o"), "--rewrite", "16:19"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    points = {p["name"]: p for p in result["points"]}
    rewritten = store_fields.rewrite(str(tmp_path / "store"), 16, 19)
    assert points["s4"]["bytes_per_token"] == round(rewritten["tokens"] + rewritten["draws"], 2)
    assert points["s4"]["bytes_per_token_as_stored"] == 60.0 and points["s4"]["layout"] == {"shard_rows": 16, "zstd_level": 19}
    assert points["s6"]["bytes_per_token"] == 7.5 and points["s6"]["layout"] is None
    with pytest.raises(SystemExit, match="want ROWS:LEVEL"):
        quality_frontier.main([str(online), "--rewrite", "64"])
