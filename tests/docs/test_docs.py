"""The docs site and the README stay true: the site builds strict (reference pages generated from
the code), the store format's plain-pyarrow reader decodes real stores exactly as kdstore does,
every user-error class has its troubleshooting entry, and the README's quickstart configs load."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BUILD_SECONDS = 60  # the budget for a strict build in CI


def _kdstore_fixtures():
    """tests/kdstore/conftest.py's row and spec factories (not importable by name: every test
    folder has a `conftest`)."""
    spec = importlib.util.spec_from_file_location("kdstore_fixtures", ROOT / "tests" / "kdstore" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_site_builds_strict_with_generated_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert seconds <= BUILD_SECONDS, f"docs build took {seconds:.0f} s"

    from flows.cli import build_parser
    from pipeline.config import CacheConfig
    from pipeline.train.train_config import TrainConfig

    cli = (site / "reference" / "cli" / "index.html").read_text()
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    for name, sub in commands.items():
        assert f"kdcache {name}" in cli, name
        for action in sub._actions:
            for option in action.option_strings if action.dest != "help" else ():
                assert option in cli, (name, option)
    config = (site / "reference" / "config" / "index.html").read_text()
    for model in (CacheConfig, TrainConfig):
        for key in model.model_fields:
            assert f"<code>{key}</code>" in config, (model.__name__, key)
    losses = (site / "reference" / "losses" / "index.html").read_text()
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        from reference import loss_entries, undocumented_keys
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    assert not undocumented_keys(), "give these keys a comment in the code (or docs/hooks/reference.py KEY_NOTES)"
    names = [e.name for e in loss_entries()]
    assert {"fkl", "sampled_kd", "hybrid_kd", "ce", "dskd", "mix"} <= set(names)
    for name in names:
        assert f"<code>{name}</code>" in losses, name
    assert (site / "results" / "benchmarks" / "index.html").is_file()


def _store_specs(fx):
    from kdstore.spec import AttentionSpec, HiddenSpec, TailSampleSpec, TopKSpec

    return {
        "every signal": fx.full_spec(),
        "int8 hidden, top-k attention, tail draws, loss mask": fx.full_spec(
            hidden=HiddenSpec(layers=(1,), width=16, dtype="int8"),
            attention=AttentionSpec(layers=(0,), heads=(1,), dtype="uint16", topk=3),
            tail_sample=TailSampleSpec(n_draws=6, scheme="systematic"), loss_mask=True, text=False),
        "bfloat16 hidden, top-p, float32 log-probs, V > 65,536": fx.full_spec(
            vocab_size=70_000, topk=TopKSpec(k=4, sampler="topp_k", top_p=0.5, logp_step=0.0),
            hidden=HiddenSpec(layers=(0,), width=8, dtype="bfloat16"), attention=None, sampled=None),
    }


@pytest.mark.parametrize("variant", ["every signal", "int8 hidden, top-k attention, tail draws, loss mask",
                                     "bfloat16 hidden, top-p, float32 log-probs, V > 65,536"])
def test_store_format_reader_decodes_like_kdstore(tmp_path, variant):
    """The plain pyarrow + zarr reader of docs/store-format.md reads every field of a real store
    exactly as kdstore's reader does, and finds an altered byte."""
    from kdstore.reader import StoreReader
    from kdstore.writer import StoreWriter

    fx = _kdstore_fixtures()
    spec = _store_specs(fx)[variant]
    rows = fx.make_rows(spec, 4, seed=3)  # two record batches of 3 and 1 rows
    if spec.loss_mask:
        rows["loss_mask"] = rows["valid"] & (np.arange(spec.row_length) % 2 == 0)
    if spec.tail_sample is not None:  # tail draws: ids outside each position's top-k
        n = spec.tail_sample.n_draws
        ids = (rows["topk_ids"].max(axis=-1, keepdims=True) + 1 + np.arange(n)) % spec.vocab_size
        counts = np.zeros(ids.shape, np.int64)
        counts[..., :3] = 2
        rows.update(tail_ids=ids * (counts > 0), tail_counts=counts)
    store = tmp_path / "store"
    StoreWriter(store, spec, fx.PROVENANCE).write_shard("doc-train-00000", rows)

    namespace: dict = {}
    exec(compile(_code_blocks(DOCS / "store-format.md", "python")[0], "store-format.md", "exec"), namespace)
    assert namespace["committed_shards"](store) == ["doc-train-00000"]
    ours = namespace["read_shard"](store, "doc-train-00000")
    theirs = StoreReader(store).read_shard("doc-train-00000")
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)

    target = store / "shards" / "doc-train-00000" / "topk_logp.arrow"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="topk_logp.arrow"):
        namespace["read_shard"](store, "doc-train-00000")


def _user_error_classes() -> set[str]:
    names = set()
    for folder in ("kdstore", "pipeline", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"^class (\w+Error)\(", path.read_text(), flags=re.M))
    return names


def test_troubleshooting_covers_every_error_class():
    page = (DOCS / "guides" / "troubleshooting.md").read_text()
    headings = set(re.findall(r"^#+ `(\w+)`", page, flags=re.M))
    missing = sorted(_user_error_classes() - headings)
    assert not missing, f"docs/guides/troubleshooting.md has no section for {missing}"


def test_readme_is_short_and_its_quickstart_configs_load():
    from pipeline.config import CacheConfig, parse_config
    from pipeline.evaluation.evaluate import EvalConfig
    from pipeline.train.train_config import TrainConfig

    readme = ROOT / "README.md"
    text = readme.read_text()
    assert len(text.splitlines()) <= 250
    assert "../shared" not in text
    models = {"cache": CacheConfig, "train": TrainConfig, "eval": EvalConfig}
    seen = set()
    for block in _code_blocks(readme, "yaml"):
        kind = re.match(r"# (\w+) config", block)
        if kind:
            parse_config(yaml.safe_load(block), models[kind.group(1)], f"README.md ({kind.group(1)} config)")
            seen.add(kind.group(1))
    assert seen == set(models), f"README quickstart configs found: {sorted(seen)}"
    for target in re.findall(r"\]\(((?:docs|bench|configs|examples)/[^)#]+)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


OLD_README = "c72c9fd"  # the last README that held the benchmark log, before docs/results


def test_no_figure_of_the_old_readme_is_lost():
    """Every number of the README that held the benchmark log is in the README or docs/ now."""
    old = subprocess.run(["git", "show", f"{OLD_README}:README.md"], cwd=ROOT, capture_output=True, text=True)
    if old.returncode != 0:
        pytest.skip(f"commit {OLD_README} is not in this clone")
    number = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")
    now = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))
    have = {m.group(0).rstrip(",") for m in number.finditer(now)}
    lost = sorted({m.group(0).rstrip(",") for m in number.finditer(old.stdout)} - have)
    assert not lost, f"figures of the old README found nowhere in README.md or docs/: {lost}"


@pytest.mark.slow
def test_store_format_reader_reads_a_cached_store(tmp_path, tiny_teacher_dir):
    """The same reader on a store the teacher pass wrote (real provenance, shard ids, teacher/)."""
    from short_docs import cache_short_docs, write_short_docs

    from kdstore.reader import StoreReader

    store = cache_short_docs(tmp_path / "store", tiny_teacher_dir, write_short_docs(tmp_path),
                             signals={"topk": {"k": 8}, "sampled": {"n_draws": 6, "scheme": "systematic"},
                                      "text": True})
    namespace: dict = {}
    exec(compile(_code_blocks(DOCS / "store-format.md", "python")[0], "store-format.md", "exec"), namespace)
    reader = StoreReader(store)
    shards = namespace["committed_shards"](store)
    assert shards == reader.shard_ids() and shards
    for shard_id in shards:
        assert re.fullmatch(r"[0-9a-f]{16}-train-\d{5}", shard_id)
        ours, theirs = namespace["read_shard"](store, shard_id), reader.read_shard(shard_id)
        for name, expected in theirs.items():
            np.testing.assert_array_equal(ours[name], expected, err_msg=f"{shard_id} {name}")
