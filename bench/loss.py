"""Output loss alone, forward + backward: CE vs each output loss, fused vs whole logits, time and
peak memory, at V = 49,152 (SmolLM2) and 151,936 (Qwen2.5).

    .venv/bin/python -m bench.loss [--tokens 2048] [--memory-tokens 8192] [--device auto] [--quick]

Inputs: a hidden state [tokens, d] and an output head [V, d] (d = 576), both requiring grad; a
top-64 + tail teacher batch (distinct kept ids per token, random log-probs), 8 sampled draws, the
next-token labels. Each loss runs as the trainer runs it: `fused` (last hidden state + head,
logits chunk by chunk: `pipeline.train.losses.fused`) and `whole` (logits = hidden @ head.T,
then the loss on whole logits: the path before fusion, still used by alignment losses). The
head's matmuls are inside both timings, so the ratios compare what a step pays for its output.

Time: best of --reps runs (process CPU time and wall time) after one warm-up, per case.
Peak memory: each case in its own process (`--case ...`): on CUDA torch.cuda.max_memory_allocated
minus what was allocated before the loss; on CPU the growth of the peak resident set (VmHWM,
reset through /proc/self/clear_refs after the inputs exist) over the resident set before the
loss. (tracemalloc does not see torch's allocations; torch has no CPU allocator statistics.)
The whole-logits path at V = 151,936 over 8,192 tokens needs ~20 GB: it is measured at
--whole-memory-tokens (default 1,024) and scaled linearly to --memory-tokens (every buffer of
that path is [tokens, V]); the JSON says so (`whole_peak_scaled_from_tokens`).
Prints a table and, last, one JSON line (loss_fkl_vs_ce_time_ratio_v49152: fused fkl / fused ce;
loss_peak_mb_v151936: fused fkl's peak at --memory-tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from bench.common import REPO, proc_status_kb, repo_env, reset_peak_rss, sync
from pipeline.train.losses import StudentOutputs, WeightedSum
from pipeline.train.losses.output import CrossEntropyLoss, DistributionLoss
from pipeline.train.losses.sampled import SampledKDLoss

VOCABS = (49_152, 151_936)
LOSSES = ("ce", "fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "sampled_kd", "fkl+ce")
MB = 1024 * 1024


def make_loss(name: str):
    if name == "ce":
        return CrossEntropyLoss()
    if name == "sampled_kd":
        return SampledKDLoss()
    if name == "fkl+ce":
        return WeightedSum([(0.5, DistributionLoss("fkl")), (0.5, CrossEntropyLoss())])
    return DistributionLoss(name)


def make_inputs(tokens: int, vocab: int, hidden: int, k: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 2
    # distinct ids per row: a random start plus multiples of a prime coprime with both vocabularies
    ids = (torch.randint(0, vocab, (1, tokens, 1), generator=g) + torch.arange(k) * 7919) % vocab
    lp = torch.log_softmax(2 * torch.randn(1, tokens, k + 1, generator=g), -1).sort(-1, descending=True).values
    draws = torch.randint(0, vocab, (1, tokens, 8), generator=g)
    batch = {"valid": torch.ones(1, tokens, dtype=torch.bool), "input_ids": torch.randint(0, vocab, (1, tokens), generator=g),
             "topk_ids": ids.int(), "topk_logp": lp[..., :k].contiguous(), "topk_tail": lp[..., k].exp().contiguous(),
             "draw_ids": draws.int(), "draw_counts": torch.ones_like(draws, dtype=torch.int32)}
    return h.to(device), w.to(device), {key: v.to(device) for key, v in batch.items()}


def step(loss, h: torch.Tensor, w: torch.Tensor, batch: dict, fused: bool) -> None:
    hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    student = StudentOutputs(None, output_head=ww, last_hidden=hh) if fused else StudentOutputs(hh @ ww.T)
    loss(student, batch).total.backward()


def time_case(name: str, fused: bool, inputs, reps: int, device: torch.device) -> dict[str, float]:
    loss = make_loss(name)
    step(loss, *inputs, fused)  # warm-up
    walls, cpus = [], []
    for _ in range(reps):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        step(loss, *inputs, fused)
        sync(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": min(walls), "cpu_s": min(cpus)}


# ---------------------------------------------------------------- memory (own process)


def memory_case(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    inputs = make_inputs(args.case_tokens, args.case_vocab, args.hidden, args.k, device)
    loss = make_loss(args.case)
    fused = args.case_path == "fused"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(loss, *inputs, fused)
        torch.cuda.synchronize(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - before) / MB, "method": "cuda max_memory_allocated"}
    reset_peak_rss()  # VmHWM := VmRSS
    before = proc_status_kb("VmRSS") or 0
    step(loss, *inputs, fused)
    return {"peak_mb": ((proc_status_kb("VmHWM") or 0) - before) / 1024, "method": "VmHWM growth (CPU)"}


def memory_in_subprocess(name: str, path: str, vocab: int, tokens: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "bench.loss", "--case", name, "--case-path", path, "--case-vocab", str(vocab),
           "--case-tokens", str(tokens), "--device", args.device, "--hidden", str(args.hidden), "--k", str(args.k),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, env=repo_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {name}/{path}/V={vocab} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the timed cases")
    parser.add_argument("--memory-tokens", type=int, default=8192, help="tokens of the memory cases")
    parser.add_argument("--whole-memory-tokens", type=int, default=1024,
                        help="tokens of the whole-logits memory cases (scaled to --memory-tokens)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: ce and fkl only, 256 timed tokens, 1 rep, memory over 1,024 (whole: 256)")
    parser.add_argument("--case", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--case-path", choices=("fused", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--case-vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(memory_case(args)))
        return
    if args.quick:
        args.tokens, args.reps, args.memory_tokens, args.whole_memory_tokens = 256, 1, 1024, 256
        args.losses = ["ce", "fkl"]
    device = torch.device(args.device)
    names = list(dict.fromkeys(["ce", "fkl", *args.losses]))
    times: dict[str, dict[str, dict[str, float]]] = {}
    for vocab in VOCABS:
        inputs = make_inputs(args.tokens, vocab, args.hidden, args.k, device)
        for name in names:
            for path in ("fused", "whole"):
                times.setdefault(f"v{vocab}", {})[f"{name}/{path}"] = time_case(name, path == "fused", inputs, args.reps, device)
            print(f"timed V={vocab} {name}", file=sys.stderr, flush=True)
        del inputs
    memory: dict[str, dict[str, float]] = {}
    if not args.no_memory:
        for vocab in VOCABS:
            for name in ("ce", "fkl"):
                fused = memory_in_subprocess(name, "fused", vocab, args.memory_tokens, args)
                whole = memory_in_subprocess(name, "whole", vocab, args.whole_memory_tokens, args)
                memory.setdefault(f"v{vocab}", {})[f"{name}/fused"] = round(fused, 1)
                memory[f"v{vocab}"][f"{name}/whole"] = round(whole * args.memory_tokens / args.whole_memory_tokens, 1)
                print(f"memory V={vocab} {name}: fused {fused:.0f} MB", file=sys.stderr, flush=True)

    print(f"## output loss, forward + backward (head matmuls included): {args.tokens} tokens, d={args.hidden}, "
          f"top-{args.k} + tail, {device} ({torch.get_num_threads()} threads)")
    print()
    print("| V | loss | fused CPU s | whole CPU s | fused wall s | fused vs fused CE (CPU) | whole vs whole CE (CPU) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    per_loss: dict[str, Any] = {}
    for vocab in VOCABS:
        t = times[f"v{vocab}"]
        for name in names:
            f, w = t[f"{name}/fused"], t[f"{name}/whole"]
            rf, rw = f["cpu_s"] / t["ce/fused"]["cpu_s"], w["cpu_s"] / t["ce/whole"]["cpu_s"]
            print(f"| {vocab:,} | {name} | {f['cpu_s']:.3f} | {w['cpu_s']:.3f} | {f['wall_s']:.3f} | {rf:.3f} | {rw:.3f} |")
            per_loss.setdefault(f"v{vocab}", {})[name] = {
                "fused_cpu_s": round(f["cpu_s"], 4), "fused_wall_s": round(f["wall_s"], 4),
                "whole_cpu_s": round(w["cpu_s"], 4), "whole_wall_s": round(w["wall_s"], 4),
                "fused_vs_ce": round(rf, 4), "whole_vs_ce": round(rw, 4)}
    if memory:
        print()
        print(f"Peak memory of the loss over {args.memory_tokens} tokens, MB ({'CUDA allocated' if device.type == 'cuda' else 'resident-set growth'}; "
              f"whole-logits cases measured at {args.whole_memory_tokens} tokens and scaled):")
        print()
        print("| V | loss | fused MB | whole MB | fused / whole |")
        print("|---:|---|---:|---:|---:|")
        for vocab in VOCABS:
            m = memory[f"v{vocab}"]
            for name in ("ce", "fkl"):
                print(f"| {vocab:,} | {name} | {m[f'{name}/fused']:,.0f} | {m[f'{name}/whole']:,.0f} | "
                      f"{m[f'{name}/fused'] / max(m[f'{name}/whole'], 1e-9):.3f} |")
    t49 = times["v49152"]
    result: dict[str, Any] = {
        # the target figures: the paths the trainer takes (fused for every output loss)
        "loss_fkl_vs_ce_time_ratio_v49152": round(t49["fkl/fused"]["cpu_s" if device.type == "cpu" else "wall_s"]
                                                  / t49["ce/fused"]["cpu_s" if device.type == "cpu" else "wall_s"], 4),
        "loss_fkl_vs_ce_time_ratio_v49152_whole": round(t49["fkl/whole"]["cpu_s"] / t49["ce/whole"]["cpu_s"], 4),
        "loss_peak_mb_v151936": memory.get("v151936", {}).get("fkl/fused"),
        "loss_peak_mb_v151936_whole": memory.get("v151936", {}).get("fkl/whole"),
        "time_basis": "process CPU time" if device.type == "cpu" else "wall time",
        "tokens": args.tokens, "memory_tokens": args.memory_tokens,
        "whole_peak_scaled_from_tokens": args.whole_memory_tokens,
        "device": f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device),
        "per_loss": per_loss, "memory_mb": memory,
    }
    if memory:
        result["loss_peak_fused_vs_whole_v151936"] = round(result["loss_peak_mb_v151936"] / max(result["loss_peak_mb_v151936_whole"], 1e-9), 4)
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
