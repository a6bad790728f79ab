"""Which teacher layers a `teacher_layers` student should keep: greedy layer removal by perplexity.

    python -m bench.student_layers --store runs/chat_demo/store --keep 12

Evenly spaced layers are the usual default (DistilBERT), but this teacher does not survive it:
6 or 12 of SmolLM2-135M's 30 layers, evenly spaced, start at perplexity 10^6–10^7 and the student
is trained from a broken init. Removing one layer at a time, always the one whose removal hurts
least (ShortGPT, arXiv 2403.03853, with perplexity as the measure), keeps the model usable far
longer: 12 layers at perplexity ~93 on the chat demo's rows. The rows come from a store (its
training rows: choosing layers on them leaks nothing held out); `--teacher` must be its teacher.

Prints one line per removal (layers kept, perplexity, the list), then the JSON last line
{"keep": [...], "ppl": ..., "curve": [[n_layers, ppl], ...]}.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from kdstore.reader import StoreReader
from pipeline.capture.teacher import load_teacher


def perplexity(model, layers, keep: list[int], ids: torch.Tensor) -> float:
    """Of the teacher with only the `keep` layers, over every position of the rows (padding
    included: only the ranking of the candidates matters)."""
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    model.config.num_hidden_layers = len(keep)
    with torch.inference_mode():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a store whose rows (and teacher) to use")
    ap.add_argument("--teacher", default="default", help="the store's teacher: a name or folder (default: the embedded one)")
    ap.add_argument("--keep", type=int, default=12, help="layers to keep")
    ap.add_argument("--rows", type=int, default=3, help="rows of the store's first shard to measure on")
    args = ap.parse_args(argv)
    reader = StoreReader(args.store)
    teacher = load_teacher(args.teacher)
    rows = reader.read_shard(reader.shard_ids()[0], ["input_ids"])
    ids = torch.from_numpy(rows["input_ids"][: args.rows].astype(np.int64))
    layers = teacher.model.model.layers
    keep = list(range(len(layers)))
    curve = [[len(keep), perplexity(teacher.model, layers, keep, ids)]]
    print(f"{len(keep):3d} layers  ppl {curve[-1][1]:12.1f}", flush=True)
    while len(keep) > max(args.keep, 2):  # the first and last layers always stay
        ppl, drop = min((perplexity(teacher.model, layers, [k for k in keep if k != d], ids), d)
                        for d in keep[1:-1])
        keep.remove(drop)
        curve.append([len(keep), ppl])
        print(f"{len(keep):3d} layers  ppl {ppl:12.1f}  {keep}", flush=True)
    print(json.dumps({"keep": keep, "ppl": round(curve[-1][1], 2), "curve": [[n, round(p, 2)] for n, p in curve]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
