"""`python -m bench.quality --variant NAME:BASE:JSON`: a sweep point is the base method with its first
loss's config merged (or its losses replaced by a JSON list); bad ones are refused with one line
before any method trains."""

from __future__ import annotations

import pytest

from bench import quality, quality_report


def test_variant_merges_into_the_base_loss_and_refuses_bad_ones():
    table = quality.methods(quality.PRESETS["cpu"])
    name, base, losses = quality.parse_variant('warm:cross_tokenizer_cma:{"projector_warmup_steps": 52}', table)
    assert (name, base, losses) == ("warm", "cross_tokenizer_cma", [{"name": "dskd_cma", "t2s_weight": 0.0,
                                                                      "projector_warmup_steps": 52}])
    mixed = quality.parse_variant('mix:sample12:[{"name": "sampled_kd"}, {"name": "ce", "weight": 0.1}]', table)
    assert mixed[2] == [{"name": "sampled_kd"}, {"name": "ce", "weight": 0.1}]
    for bad, says in [('x:topk64:[{"name": "fkl", "label_tail": 1}, {"name": "nope"}]', "nope"),
                      ("x:topk64:[]", "NEW_NAME"), ('x:cross_tokenizer_cma:{"projector_warmup_stepz": 5}', "unknown key"),
                      ("x:nope:{}", "BASE one of"), ("ce:topk64:{}", "NEW_NAME"), ("x:ce:{bad", "does not parse")]:
        with pytest.raises(SystemExit, match=says):
            quality.parse_variant(bad, table)


def test_convergence_figures_of_a_curve():
    """The CE curve of the 2026-12-02 run: 5.0 % over the last quarter, and a 13.7 % rise at the
    start of epoch 2 (overfitting); a falling curve has no rise."""
    curve = [[0, 7186.5], [26624, 282.1], [53248, 197.2], [80896, 131.8], [107264, 113.0], [133888, 128.5],
             [161536, 118.4], [188160, 115.6], [214528, 112.5]]
    assert abs(quality_report.quarter_improvement(curve) - (118.4 - 112.5) / 118.4) < 1e-12
    rise, before, after = quality_report.largest_rise(curve)
    assert (before, after) == (107264, 133888) and abs(rise - 15.5 / 113.0) < 1e-12
    assert quality_report.largest_rise([[0, 9.0], [1, 5.0], [2, 4.0]]) is None


def test_draws_sweep_adds_a_store_and_a_method_and_refuses_bad_pairs():
    preset = quality.PRESETS["cpu"]
    table = quality.methods(preset)
    name, sampled = quality.draws_method("48:systematic", table)
    assert name == "sample48_systematic" and sampled == {"signals": {"sampled": {"n_draws": 48, "scheme": "systematic"}}}
    assert table[name] == {"store": name, "losses": [{"name": "sampled_kd"}]}
    configs = quality.store_configs(preset, "default", {name: sampled})
    assert configs[name]["signals"] == sampled["signals"]
    assert configs[name]["corpus"] == configs["full"]["corpus"] and configs[name]["split"] == "train"
    assert quality.parse_variant('x:sample48_systematic:{"weight": 0.9}', table)[2] == [
        {"name": "sampled_kd", "weight": 0.9}]
    for bad in ("48", "0:systematic", "256:multinomial", "x:systematic", "12:stratified"):
        with pytest.raises(SystemExit, match="want N:SCHEME"):
            quality.draws_method(bad, table)


def test_store_sweep_runs_a_base_recipe_on_its_own_store_and_refuses_bad_ones():
    preset = quality.PRESETS["cpu"]
    table = quality.methods(preset)
    signals = {"topk": {"k": 8}, "tail_sample": {"n_draws": 8, "scheme": "systematic"}}
    name, got = quality.store_method('h8:hybrid:{"signals": {"topk": {"k": 8}, "tail_sample": {"n_draws": 8, '
                                     '"scheme": "systematic"}}, "zstd_level": 19}', table)
    assert (name, got) == ("h8", {"signals": signals, "zstd_level": 19})
    assert table["h8"] == {"store": "h8", "losses": table["hybrid"]["losses"]}
    assert quality.STORE_FIELDS["h8"] == ("tokens", "topk_", "tail_draws")
    quality.store_method('s6:sample12:{"signals": {"topk": null, "sampled": {"n_draws": 6}}}', table)
    assert quality.STORE_FIELDS["s6"] == ("tokens", "draws")
    config = quality.store_configs(preset, "default", {"h8": got})["h8"]
    assert config["signals"] == signals and config["zstd_level"] == 19 and config["shard_rows"] == 16
    for bad, says in [('x:hybrid:{"signals": {"topk": {"kk": 8}}}', "unknown key 'signals.topk.kk'"),
                      ('x:hybrid:{"signals": {"topk": null, "sampled": null}}', "at least one of topk or sampled"),
                      ('x:hybrid:{"signals": {}, "shard_rows": 64}', "would change the rows or batches"),
                      ('x:hybrid:{"topk": {"k": 8}}', "NEW_NAME"),
                      ("x:nope:{}", "BASE one of"), ('h8:hybrid:{"signals": {}}', "NEW_NAME"), ("x:ce:{bad", "does not parse")]:
        with pytest.raises(SystemExit, match=says):
            quality.store_method(bad, table)
