"""Writer → files → reader: every field kind comes back bit-exact or within its stated bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
import torch

from kdstore.codecs import Delta
from kdstore.errors import MissingFieldError
from kdstore.reader import StoreReader
from kdstore.spec import AttentionSpec, HiddenSpec, SampledSpec, StoreSpec, TopKSpec
from kdstore.verify import verify_store
from kdstore.writer import StoreWriter

LOSSLESS = ("sample_id", "input_ids", "doc_ids", "valid", "topk_ids", "topk_tail", "draw_ids", "draw_counts", "text",
            "char_end")


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).to(torch.float32).numpy()


def assert_rows_match(spec: StoreSpec, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Every field of `got` equals `want` exactly (lossless) or within its codec's bound."""
    assert got, "nothing was read"
    for name, value in got.items():
        expected = np.asarray(want[name])
        assert value.shape == expected.shape, name
        if name in LOSSLESS:
            assert np.array_equal(value, expected), name
            if name == "topk_tail":
                assert value.dtype == np.float32
                assert np.array_equal(value.view(np.uint32), expected.view(np.uint32)), name
        elif name == "topk_logp":
            assert value.dtype == np.float32
            finite = np.isfinite(expected)
            assert np.array_equal(np.isneginf(value), ~finite), "-inf padding must round-trip"
            step = spec.topk.logp_step
            if step == 0:
                assert np.array_equal(value.view(np.uint32), expected.view(np.uint32)), "float32 logp must be bit-exact"
            else:
                err = np.abs(value[finite].astype(np.float64) - expected[finite])
                assert err.max() <= step / 2 + 4e-7 * np.abs(expected[finite]).max(), err.max()
        elif name.startswith("hidden_"):
            assert value.dtype == np.float32
            dtype = spec.hidden.dtype
            if dtype == "float16":
                assert np.array_equal(value, expected.astype(np.float16).astype(np.float32)), name
            elif dtype == "bfloat16":
                assert np.array_equal(value.view(np.uint32), _bf16_round(expected).view(np.uint32)), name
            else:
                amax = np.abs(expected).max(axis=-1, keepdims=True).astype(np.float64)
                err = np.abs(value.astype(np.float64) - expected)
                assert np.all(err <= amax / 254 * (1 + 2e-3) + 1e-7), name
        elif name.startswith("attn_") and name.endswith("_ids"):
            assert np.array_equal(value, expected), name
        elif name.startswith("attn_"):
            assert value.dtype == np.float32
            bound = 0.5 / np.iinfo(spec.attention.dtype).max
            assert np.abs(value.astype(np.float64) - expected).max() <= bound * (1 + 1e-4), name
        else:
            raise AssertionError(f"no check for field {name}")


# ---------------------------------------------------------------- store variants

VARIANTS = {
    # every signal, byte ids, batches of 1 row
    "v256-f16-dense": lambda: StoreSpec(
        vocab_size=256, row_length=8, shard_rows=2, record_batch_rows=1,
        topk=TopKSpec(k=5), sampled=SampledSpec(n_draws=12),
        hidden=HiddenSpec(layers=(0, 2), width=16, dtype="float16"),
        attention=AttentionSpec(layers=(1,), heads=(0, 3), dtype="uint8"),
    ),
    # 16-bit ids, bf16 hidden, attention top-k, batches of 3 that split the shard's rows
    "v49152-bf16-attntopk": lambda: StoreSpec(
        vocab_size=49152, row_length=6, shard_rows=5, record_batch_rows=3,
        topk=TopKSpec(k=4, logp_step=0.1),
        hidden=HiddenSpec(layers=(3,), width=8, dtype="bfloat16"),
        attention=AttentionSpec(layers=(0, 2), heads=(1,), dtype="uint16", topk=3),
    ),
    # ids above 131072, int8 hidden, sampled draws
    "v151936-int8": lambda: StoreSpec(
        vocab_size=151936, row_length=4, shard_rows=2, record_batch_rows=1,
        topk=TopKSpec(k=4), sampled=SampledSpec(n_draws=6),
        hidden=HiddenSpec(layers=(1,), width=12, dtype="int8"),
    ),
    # top-p capped at k with -inf padding, float32 log-probs
    "topp-float32": lambda: StoreSpec(
        vocab_size=300, row_length=5, shard_rows=3, record_batch_rows=2,
        topk=TopKSpec(k=6, sampler="topp_k", top_p=0.6, logp_step=0.0, temperature=0.5),
    ),
}

N_SHARDS = 3


def _check_test_data(spec: StoreSpec, parts: dict[str, dict[str, np.ndarray]]) -> None:
    """The generated rows exercise what the tests claim to test."""
    rows = concat_rows(list(parts.values()))
    assert not rows["valid"].all() and rows["valid"].any()
    if spec.topk is not None:
        logp = rows["topk_logp"].astype(np.float64)
        kept = np.exp(logp).sum(axis=-1)
        np.testing.assert_allclose(rows["topk_tail"], 1 - kept, atol=1e-6)
        assert np.all(np.diff(np.maximum(logp, -1e30), axis=-1) <= 0)  # sorted descending, -inf last
        if spec.topk.sampler == "topp_k":
            assert np.isneginf(logp).any() and np.isfinite(logp).any()
    if spec.sampled is not None:
        counts = rows["draw_counts"]
        assert np.all(counts.sum(axis=-1) == spec.sampled.n_draws)
        assert (counts == 0).any()  # some padding
        assert np.all(np.diff((counts > 0).astype(int), axis=-1) <= 0)  # packed at the front


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def written(request, tmp_path_factory, provenance, rows_for):
    """A store with N_SHARDS shards (the last one partial), and the rows written to it."""
    make_rows = rows_for
    spec = VARIANTS[request.param]()
    url = tmp_path_factory.mktemp(request.param) / "store"
    writer = StoreWriter(url, spec, provenance)
    parts, next_id = {}, 1000
    for i in range(N_SHARDS):
        n = spec.shard_rows if i < N_SHARDS - 1 else max(1, spec.shard_rows - 1)
        rows = make_rows(spec, n, first_id=next_id, seed=i)
        if spec.vocab_size > 1 << 17:
            rows["input_ids"][0, 0] = spec.vocab_size - 1
        next_id += n + 7  # gaps between shards' ids
        result = writer.write_shard(f"part-{i:03d}", rows, meta={"i": i})
        assert not result.skipped and result.record.rows == n
        parts[f"part-{i:03d}"] = rows
    _check_test_data(spec, parts)
    return spec, url, parts


def test_full_shards_round_trip(written):
    spec, url, parts = written
    reader = StoreReader(url)
    assert reader.shard_ids() == sorted(parts)
    assert reader.num_rows() == sum(len(p["sample_id"]) for p in parts.values())
    for shard_id, rows in parts.items():
        got = reader.read_shard(shard_id)
        assert set(got) == set(rows) == set(reader.field_names)
        assert_rows_match(spec, got, rows)
        record = reader.record(shard_id)
        assert record.rows == len(rows["sample_id"])
        assert record.valid_tokens == int(rows["valid"].sum())
        assert record.meta == {"i": int(shard_id[-3:])}
    if spec.topk is not None:
        schema = pyarrow.ipc.open_file(str(url / "shards" / shard_id / "topk_logp.arrow")).schema
        stored = pa.float32() if spec.topk.logp_step == 0 else pa.uint16()
        assert schema.field("topk_logp").type.value_type == stored
    if "topk_ids" in reader.field_names and spec.vocab_size > 1 << 17:
        ids = np.concatenate([reader.read_shard(s, ["topk_ids"])["topk_ids"].ravel() for s in parts])
        tokens = np.concatenate([reader.read_shard(s, ["input_ids"])["input_ids"].ravel() for s in parts])
        assert ids.max() > 131072 and tokens.max() == spec.vocab_size - 1


def test_iter_shards_yields_every_committed_shard(written):
    spec, url, parts = written
    seen = dict(StoreReader(url).iter_shards(["sample_id"]))
    assert sorted(seen) == sorted(parts)
    for shard_id, got in seen.items():
        np.testing.assert_array_equal(got["sample_id"], parts[shard_id]["sample_id"])


def test_read_samples_random_access_across_shards(written):
    spec, url, parts = written
    everything = concat_rows(list(parts.values()))
    ids = everything["sample_id"]
    rng = np.random.default_rng(11)
    order = rng.permutation(len(ids))
    order = np.concatenate([order, order[:2]])  # the same sample twice
    reader = StoreReader(url)
    got = reader.read_samples(ids[order].tolist())
    assert set(got) == set(reader.field_names)
    assert_rows_match(spec, got, {k: v[order] for k, v in everything.items()})
    # one sample, a projection, and the ids in reverse
    one = reader.read_samples([int(ids[-1])], ["sample_id", "input_ids"])
    assert set(one) == {"sample_id", "input_ids"}
    np.testing.assert_array_equal(one["input_ids"], everything["input_ids"][-1:])


def test_read_shard_selected_rows_in_any_order(written):
    spec, url, parts = written
    reader = StoreReader(url)
    shard_id, rows = sorted(parts.items())[0]
    n = len(rows["sample_id"])
    pick = np.array([n - 1, 0, n - 1] + list(range(n))[::-1])
    got = reader.read_shard(shard_id, rows=pick)
    assert_rows_match(spec, got, {k: v[pick] for k, v in rows.items()})


def test_bad_or_empty_row_requests(written):
    spec, url, parts = written
    reader = StoreReader(url)
    shard_id, rows = sorted(parts.items())[0]
    n = len(rows["sample_id"])
    for bad in ([n], [0, -1]):
        with pytest.raises(IndexError, match=f"shard {shard_id}"):  # a bad request, not corruption
            reader.read_shard(shard_id, rows=np.array(bad))
    for empty in (reader.read_shard(shard_id, rows=np.array([], dtype=int)), reader.read_samples([])):
        assert set(empty) == set(reader.field_names)
        for name, value in empty.items():
            assert value.shape == (0, *rows[name].shape[1:]), name
    with pytest.raises(MissingFieldError):
        reader.read_samples([], ["nope"])


def test_column_projection_returns_only_what_was_asked(written):
    spec, url, parts = written
    reader = StoreReader(url)
    shard_id, rows = sorted(parts.items())[-1]
    dense = [n for n in reader.field_names if n.startswith(("hidden_", "attn_"))]
    for wanted in (["valid"], ["topk_tail", "sample_id"] if spec.topk else ["doc_ids"], dense[:1], dense[::-1]):
        if not wanted:
            continue
        got = reader.read_shard(shard_id, wanted)
        assert list(got) == wanted
        assert_rows_match(spec, got, rows)
    with pytest.raises(MissingFieldError) as info:
        reader.read_shard(shard_id, ["sample_id", "no_such_field"])
    assert "no_such_field" in str(info.value) and "sample_id" in str(info.value)


def test_verify_is_clean(written):
    spec, url, parts = written
    report = verify_store(str(url))
    assert report.ok, report.problems
    assert report.shards_checked == len(parts) and report.leftovers == ()


# ---------------------------------------------------------------- on-disk types


@pytest.mark.parametrize(
    ("vocab", "arrow_type"), [(256, pa.uint8()), (49152, pa.uint16()), (65536, pa.uint16()), (65537, pa.uint32()), (151936, pa.uint32())]
)
def test_id_width_on_disk(tmp_path, rows_for, provenance, vocab, arrow_type):
    spec = StoreSpec(vocab_size=vocab, row_length=3, shard_rows=2, topk=TopKSpec(k=2), sampled=SampledSpec(n_draws=3))
    rows = rows_for(spec, 2)
    rows["input_ids"][1, 2] = vocab - 1
    StoreWriter(tmp_path, spec, provenance).write_shard("a", rows)
    shard = tmp_path / "shards" / "a"
    for file, column in (("tokens", "input_ids"), ("topk_ids", "topk_ids"), ("draws", "draw_ids")):
        schema = pyarrow.ipc.open_file(str(shard / f"{file}.arrow")).schema
        assert schema.field(column).type.value_type == arrow_type, (file, column)
    got = StoreReader(tmp_path).read_shard("a")
    assert got["input_ids"][1, 2] == vocab - 1
    np.testing.assert_array_equal(got["topk_ids"], rows["topk_ids"])


def test_unpacked_draws_come_back_packed(tmp_path, provenance):
    spec = StoreSpec(vocab_size=1000, row_length=2, shard_rows=1, sampled=SampledSpec(n_draws=8))
    ids = np.array([[[5, 0, 9, 7, 0], [3, 0, 0, 0, 0]]])
    counts = np.array([[[2, 0, 5, 1, 0], [8, 0, 0, 0, 0]]])
    rows = {
        "sample_id": np.array([4]), "input_ids": np.zeros((1, 2), np.int64),
        "doc_ids": np.zeros((1, 2), np.int32), "valid": np.ones((1, 2), bool),
        "draw_ids": ids, "draw_counts": counts,
    }  # fmt: skip
    StoreWriter(tmp_path, spec, provenance).write_shard("x", rows)
    got = StoreReader(tmp_path).read_shard("x", ["draw_ids", "draw_counts"])
    assert got["draw_ids"].shape == (1, 2, 8)  # padded to n_draws
    np.testing.assert_array_equal(got["draw_ids"][0, 0], [5, 9, 7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["draw_counts"][0, 0], [2, 5, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["draw_counts"][0, 1], [8, 0, 0, 0, 0, 0, 0, 0])
    assert got["draw_counts"].sum(axis=-1).tolist() == [[8, 8]]


# ---------------------------------------------------------------- plain pyarrow + zarr

PLAIN_READER = textwrap.dedent(
    """
    import json, pathlib, sys
    import numpy as np, pyarrow.ipc, zarr
    out = {"arrow": {}, "zarr": {}}
    root = pathlib.Path(sys.argv[1])
    for path in sorted(root.glob("shards/*/*.arrow")):
        reader = pyarrow.ipc.open_file(str(path))
        table = reader.read_all()
        columns = {}
        for field in table.schema:
            meta = json.loads(field.metadata[b"kdcache_field"])
            flat = table.column(field.name).combine_chunks()
            while hasattr(flat, "values"):
                flat = flat.values
            columns[field.name] = {"codecs": [c["name"] for c in meta["codecs"]],
                                   "sum": int(np.asarray(flat).astype(np.int64).sum()) if flat.type.bit_width <= 32 and "int" in str(flat.type) else None}
        out["arrow"][str(path.relative_to(root))] = {"rows": table.num_rows, "batches": reader.num_record_batches, "columns": columns}
    for meta_file in sorted(root.glob("shards/*/dense.zarr/*/zarr.json")):
        array = zarr.open_array(str(meta_file.parent), mode="r")
        data = array[...]
        out["zarr"][str(meta_file.parent.relative_to(root))] = {
            "shape": list(data.shape), "dtype": str(data.dtype),
            "codecs": [c["name"] for c in array.attrs["kdcache_field"]["codecs"]],
        }
    assert not any(m.startswith(("kdstore", "pipeline", "flows")) for m in sys.modules), "kdcache was imported"
    print(json.dumps(out))
    """
)


def test_plain_pyarrow_and_zarr_read_every_file(tmp_path, rows_for, provenance):
    spec = StoreSpec(
        vocab_size=49152, row_length=5, shard_rows=3, record_batch_rows=2,
        topk=TopKSpec(k=3), sampled=SampledSpec(n_draws=4),
        hidden=HiddenSpec(layers=(0,), width=4, dtype="int8"),
        attention=AttentionSpec(layers=(1,), heads=(0,), topk=2),
    )  # fmt: skip
    writer = StoreWriter(tmp_path, spec, provenance)
    written = {s: rows_for(spec, 3, first_id=10 * i, seed=i) for i, s in enumerate(("a", "b"))}
    for shard_id, rows in written.items():
        writer.write_shard(shard_id, rows)
        # the hidden layer again with bf16 and float16 would need other stores; dense
        # coverage here is int8 (two arrays) + attention top-k (ids and probabilities)
    proc = subprocess.run([sys.executable, "-c", PLAIN_READER, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    files = sorted(out["arrow"])
    assert files == sorted(f"shards/{s}/{g}.arrow" for s in written for g in ("tokens", "topk_ids", "topk_logp", "topk_tail", "draws"))
    for shard_id, rows in written.items():
        tokens = out["arrow"][f"shards/{shard_id}/tokens.arrow"]
        assert tokens["rows"] == 3 and tokens["batches"] == 2
        assert tokens["columns"]["input_ids"]["codecs"] == ["cast"]
        assert tokens["columns"]["input_ids"]["sum"] == int(rows["input_ids"].sum())
        logp = out["arrow"][f"shards/{shard_id}/topk_logp.arrow"]["columns"]["topk_logp"]
        assert logp["codecs"] == ["log_quant", "delta", "byte_planes"]
        draws = out["arrow"][f"shards/{shard_id}/draws.arrow"]["columns"]
        assert draws["draw_counts"]["sum"] == int(rows["draw_counts"].sum())
        # each token's draw ids are packed at its front and delta-coded within the token (uint16)
        ids, kept = rows["draw_ids"], rows["draw_counts"] > 0
        slot = np.arange(ids.shape[-1]) < kept.sum(-1)[..., None]
        packed = np.zeros(ids.shape, np.uint16)
        packed[slot] = ids[kept]
        assert draws["draw_ids"]["codecs"] == ["cast", "delta"]
        assert draws["draw_ids"]["sum"] == int(Delta().encode(packed)[slot].astype(np.int64).sum())
        dense = {k.split("/")[-1]: v for k, v in out["zarr"].items() if k.startswith(f"shards/{shard_id}/")}
        assert dense["hidden_0"] == {"shape": [3, 5, 4], "dtype": "int8", "codecs": ["int8_rowscale"]}
        assert dense["hidden_0_scale"]["shape"] == [3, 5]
        assert dense["attn_1_ids"]["dtype"] == "uint8" and dense["attn_1_ids"]["shape"] == [3, 1, 5, 2]
        assert dense["attn_1_p"]["codecs"] == ["prob_quant"]


def test_arrow_field_metadata_holds_the_codec_chain(tmp_path, rows_for, provenance, spec_with):
    spec = spec_with()
    StoreWriter(tmp_path, spec, provenance).write_shard("m", rows_for(spec, 2))
    schema = pyarrow.ipc.open_file(str(tmp_path / "shards/m/topk_logp.arrow")).schema
    meta = json.loads(schema.field("topk_logp").metadata[b"kdcache_field"])
    assert meta["codecs"] == [
        {"name": "log_quant", "configuration": {"step": spec.topk.logp_step, "dtype": "uint16"}},
        {"name": "delta", "configuration": {}},
        {"name": "byte_planes", "configuration": {}},
    ]
    store_json = json.loads((tmp_path / "store.json").read_text())
    assert {f["name"]: f["codecs"] for f in store_json["fields"]}["topk_logp"] == meta["codecs"]


# ---------------------------------------------------------------- memory://


def test_memory_store_write_read_verify(memory_url, rows_for, provenance, spec_with):
    spec = spec_with(shard_rows=3, hidden=HiddenSpec(layers=(1,), width=8, dtype="bfloat16"))
    writer = StoreWriter(memory_url, spec, provenance)
    parts = {f"m{i}": rows_for(spec, 3 - i, first_id=100 * i, seed=i) for i in range(3)}
    for shard_id, rows in parts.items():
        assert not writer.write_shard(shard_id, rows).skipped
    assert writer.write_shard("m0", parts["m0"]).skipped
    reader = StoreReader(memory_url)
    assert reader.shard_ids() == sorted(parts)
    for shard_id, rows in parts.items():
        assert_rows_match(spec, reader.read_shard(shard_id), rows)
    everything = concat_rows(list(parts.values()))
    order = np.random.default_rng(0).permutation(len(everything["sample_id"]))
    got = reader.read_samples(everything["sample_id"][order].tolist())
    assert_rows_match(spec, got, {k: v[order] for k, v in everything.items()})
    report = verify_store(memory_url)
    assert report.ok and report.shards_checked == 3, report.problems
    writer.write_teacher_tensors("head", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(reader.read_teacher_tensors("head")["w"], np.arange(6).reshape(2, 3))


def test_a_format_1_store_still_reads_verifies_and_grows_in_its_own_layout(tmp_path, rows_for, provenance):
    """Format 2 changed the top-k log-prob and draw-id chains; a store written in format 1 keeps
    its layout (store.json's), verifies against format 1's, and new shards are written in it."""
    from kdstore.fields import fields_for_spec
    from kdstore.records import STORE_JSON_INDENT, StoreMeta, json_bytes

    spec = StoreSpec(vocab_size=1000, row_length=6, shard_rows=2, topk=TopKSpec(k=3), sampled=SampledSpec(n_draws=4))
    new = StoreMeta.new(spec, provenance)
    old = fields_for_spec(spec, 1)
    assert old != new.fields
    (tmp_path / "store.json").write_bytes(json_bytes(StoreMeta(spec, provenance, new.fingerprint, old, 1).to_json(),
                                                     STORE_JSON_INDENT))
    first = rows_for(spec, 2, seed=1)
    writer = StoreWriter(tmp_path, spec, provenance)
    assert writer.meta.format_version == 1 and writer.meta.fields == old
    writer.write_shard("a", first)
    schema = pyarrow.ipc.open_file(str(tmp_path / "shards/a/topk_logp.arrow")).schema
    assert [c["name"] for c in json.loads(schema.field("topk_logp").metadata[b"kdcache_field"])["codecs"]] == [
        "log_quant", "delta"]
    got = StoreReader(tmp_path).read_shard("a")
    for name in ("topk_ids", "draw_ids", "draw_counts"):
        np.testing.assert_array_equal(got[name], first[name], err_msg=name)
    report = verify_store(str(tmp_path))
    assert report.ok, report


def test_draw_ids_in_any_order_round_trip(tmp_path, provenance):
    """Draw ids are delta-coded within each token; ids out of order (or a token whose ids wrap
    the uint16 range) still come back exactly."""
    spec = StoreSpec(vocab_size=49152, row_length=3, shard_rows=1, sampled=SampledSpec(n_draws=4))
    ids = np.array([[[49151, 3, 40000, 0], [7, 0, 0, 0], [0, 0, 0, 0]]])
    counts = np.array([[[1, 2, 1, 0], [4, 0, 0, 0], [0, 0, 0, 0]]])
    rows = {"sample_id": np.array([1]), "input_ids": np.zeros((1, 3), np.int64), "doc_ids": np.zeros((1, 3), np.int32),
            "valid": np.ones((1, 3), bool), "draw_ids": ids, "draw_counts": counts}
    StoreWriter(tmp_path, spec, provenance).write_shard("x", rows)
    got = StoreReader(tmp_path).read_shard("x", ["draw_ids", "draw_counts"])
    np.testing.assert_array_equal(got["draw_ids"], ids)
    np.testing.assert_array_equal(got["draw_counts"], counts)


def test_a_store_json_with_an_altered_layout_is_refused_by_the_writer(tmp_path, rows_for, provenance, spec_with):
    """The writer adopts store.json's layout (an older format keeps its own), but not one that its
    spec and format version do not imply: it refuses before writing, and what is there stays."""
    from kdstore.errors import StoreError

    spec = spec_with()
    StoreWriter(tmp_path, spec, provenance).write_shard("a", rows_for(spec, 1))
    data = json.loads((tmp_path / "store.json").read_text())
    logp = next(f for f in data["fields"] if f["name"] == "topk_logp")
    logp["codecs"] = logp["codecs"][:2]  # byte_planes dropped from a format-2 store
    (tmp_path / "store.json").write_text(json.dumps(data, indent=2))
    with pytest.raises(StoreError, match="field layout is not what its spec and format version 2 imply"):
        StoreWriter(tmp_path, spec, provenance)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["a"]
