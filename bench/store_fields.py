"""Where a built store's bytes go, column by column, and what lossless recodings of its draws would save.

    python -m bench.store_fields STORE [STORE ...]

`bench.store` measures signals on teacher slices; this reads stores the teacher pass wrote (the
quality benchmark's, or any `kdcache cache` output), so the figures are those of a real capture.
For every Arrow column of every shard (the ragged groups' `draw_n` included) it prints the
stored bytes per token once zstd-compressed at the store's level and at 19, and for the draw
groups two recodings that need no new container: the ids with the next token (the row's label)
written as the code 0 (`label_zero`), and the ids' empirical unigram entropy (a bound for an
entropy coder with a vocabulary-frequency table). Also how often the next token is among the
draws, and the share of ids drawn once. `--rewrite ROWS:LEVEL,...` writes the same rows again
with `StoreWriter` at another shard size and zstd level (lossless: only the container changes)
and reports the signal files' bytes/token of each: a shard's Arrow files carry a fixed cost
(schema, codec metadata, footer) that small shards pay per token.

Prints a table per store and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdstore.reader import StoreReader
from kdstore.shard_io import arrow_file
from kdstore.summary import summarize
from kdstore.writer import StoreWriter

DRAW_GROUPS = {"draws": ("draw_ids", "draw_counts"), "tail_draws": ("tail_ids", "tail_counts")}


def zstd_bytes(values: np.ndarray, level: int) -> int:
    return pa.Codec("zstd", level).compress(np.ascontiguousarray(values).tobytes()).size


def column_values(store: Path, shard_ids: list[str], group: str) -> dict[str, np.ndarray]:
    """Each column's stored values (after the codec chain, before zstd), flat over the shards."""
    columns: dict[str, list[np.ndarray]] = {}
    for shard in shard_ids:
        table = pa.ipc.open_file(pa.memory_map(str(store / "shards" / shard / arrow_file(group)))).read_all()
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            flat = column.flatten() if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) else column
            columns.setdefault(name, []).append(flat.to_numpy(zero_copy_only=False))
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def draw_recodings(reader: StoreReader, group: str, tokens: int, level: int) -> dict[str, float]:
    ids_name, counts_name = DRAW_GROUPS[group]
    delta, label_zero, flat_ids, once, label_in = [], [], [], 0, 0
    for shard in reader.shard_ids():
        rows = reader.read_shard(shard, [ids_name, counts_name, "input_ids"])
        ids, counts = rows[ids_name].astype(np.int64), rows[counts_name]
        label = np.concatenate([rows["input_ids"][:, 1:], np.full((len(ids), 1), -1)], 1)[..., None]
        kept = counts > 0
        d = ids.copy()
        d[..., 1:] -= ids[..., :-1]  # the stored delta of ascending ids (format 2)
        is_label = (ids == label) & kept
        delta.append(d[kept].astype(np.uint16))
        label_zero.append(np.where(is_label, 0, d)[kept].astype(np.uint16))
        flat_ids.append(ids[kept])
        once += int((counts == 1).sum())
        label_in += int(is_label.any(-1).sum())
    every = np.concatenate(flat_ids)
    freq = np.bincount(every) / max(every.size, 1)
    freq = freq[freq > 0]
    return {
        "ids_per_token": every.size / tokens, "drawn_once_share": once / max(every.size, 1),
        "label_among_draws": label_in / tokens,
        "ids_delta": zstd_bytes(np.concatenate(delta), level) / tokens,
        "ids_label_zero": zstd_bytes(np.concatenate(label_zero), level) / tokens,
        "ids_unigram_entropy": float(-(freq * np.log2(freq)).sum()) * every.size / 8 / tokens,
    }


def rewrite(path: str, shard_rows: int, level: int) -> dict[str, float]:
    """Bytes/token of each file group of the store's rows re-written with `shard_rows` and zstd `level`."""
    reader = StoreReader(path)
    spec = dataclasses.replace(reader.meta.spec, shard_rows=shard_rows, zstd_level=level)
    rows = [reader.read_shard(s) for s in reader.shard_ids()]
    every = {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}
    with tempfile.TemporaryDirectory(prefix="kdcache-rewrite-") as tmp:
        writer = StoreWriter(tmp, spec, reader.meta.provenance)
        for i, start in enumerate(range(0, len(every["sample_id"]), shard_rows)):
            writer.write_shard(f"rewrite-{i:05d}", {k: v[start : start + shard_rows] for k, v in every.items()})
        return summarize(tmp).field_bytes_per_token()


def measure(path: str) -> dict[str, Any]:
    reader = StoreReader(path)
    store, meta = Path(path), json.loads((Path(path) / "store.json").read_text())
    level = meta["spec"]["zstd_level"]
    shards = reader.shard_ids()
    tokens = sum(reader.read_shard(s, ["valid"])["valid"].size for s in shards)
    groups = dict.fromkeys(f["group"] for f in meta["fields"] if f["container"] != "zarr")
    columns = {}
    for group in groups:
        for name, values in column_values(store, shards, group).items():
            columns[f"{group}/{name}"] = {"stored_dtype": str(values.dtype), "values_per_token": values.size / tokens,
                                          "zstd_store_level": zstd_bytes(values, level) / tokens,
                                          "zstd_19": zstd_bytes(values, 19) / tokens}
    draws = {g: draw_recodings(reader, g, tokens, level) for g in DRAW_GROUPS if g in groups}
    return {"store": path, "spec": meta["spec"], "tokens": tokens, "zstd_level": level, "columns": columns,
            "draws": draws, "total_zstd_store_level": sum(c["zstd_store_level"] for c in columns.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--rewrite", default="", metavar="ROWS:LEVEL,...",
                   help="also write the rows again with these shard sizes and zstd levels, e.g. 64:1,64:19")
    args = p.parse_args(argv)
    try:
        layouts = [tuple(int(x) for x in pair.split(":")) for pair in filter(None, args.rewrite.split(","))]
        assert all(len(t) == 2 and t[0] >= 1 and 1 <= t[1] <= 22 for t in layouts)
    except (ValueError, AssertionError):
        sys.exit(f"--rewrite {args.rewrite!r}: want ROWS:LEVEL pairs, ROWS ≥ 1 and LEVEL in [1, 22], e.g. 64:19")
    results = []
    for path in args.stores:
        if not (Path(path) / "store.json").is_file():
            sys.exit(f"{path}: no store.json (not a local kdcache store)")
        r = measure(path)
        r["rewrites"] = [{"shard_rows": rows, "zstd_level": level, "bytes_per_token": rewrite(path, rows, level)}
                         for rows, level in layouts]
        results.append(r)
        print(f"\n### {path}: {r['tokens']:,} tokens, zstd level {r['zstd_level']}\n")
        print("| column | dtype | values/token | B/token | B/token at zstd 19 |\n|---|---|---:|---:|---:|")
        for name, c in r["columns"].items():
            print(f"| {name} | {c['stored_dtype']} | {c['values_per_token']:.2f} | {c['zstd_store_level']:.3f} | "
                  f"{c['zstd_19']:.3f} |")
        for group, d in r["draws"].items():
            print(f"\n{group}: {d['ids_per_token']:.2f} ids/token ({100 * d['drawn_once_share']:.0f} % drawn once), "
                  f"next token among them at {100 * d['label_among_draws']:.1f} % of positions; ids B/token: "
                  f"delta {d['ids_delta']:.3f}, label_zero {d['ids_label_zero']:.3f}, "
                  f"unigram entropy bound {d['ids_unigram_entropy']:.3f}")
        as_stored = summarize(path).field_bytes_per_token()
        if r["rewrites"]:
            print(f"\nfile bytes/token by group: as stored ({r['spec']['shard_rows']} rows/shard, zstd "
                  f"{r['zstd_level']}) {_groups(as_stored)}")
        for w in r["rewrites"]:
            print(f"  rewritten at {w['shard_rows']} rows/shard, zstd {w['zstd_level']}: {_groups(w['bytes_per_token'])}")
        r["bytes_per_token"] = as_stored
    print(json.dumps({"stores": results}))
    return 0


def _groups(per_file: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in per_file.items()) + f"; total {sum(per_file.values()):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
