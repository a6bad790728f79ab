"""The student side of `bench.gpu`: a KD-from-cache step against a CE step through the real
`Trainer`, the share of step time spent waiting for the `KDLoader`, and the output loss alone
(forward + backward, time and peak memory) beside a plain-PyTorch chunked reference.

The reference computes the same forward KL over the kept ids + one tail bucket with autograd,
one chunk of tokens at a time, each chunk's backward run before the next chunk's forward (so its
memory is bounded by one chunk's graph, not by [tokens, V]). Its value and gradients equal the
fused loss's up to rounding; `--smoke` checks that.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import log, proc_status_kb, reset_peak_rss, sync
from kdstore.writer import StoreWriter
from pipeline.train.losses import StudentOutputs
from pipeline.train.losses.fused import chunk_rows
from pipeline.train.losses.output import DistributionLoss

GB = 1024**3


# ---------------------------------------------------------------- KD step vs CE step (real Trainer)


def write_teacher_dir(writer: StoreWriter, model_config: Any) -> None:
    """teacher/ of a synthetic store: the student's model config and a small word-level tokenizer
    (the trainer builds an `init: config` student from these; no download, no real vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(254)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            writer.write_teacher_file(f"tokenizer/{path.name}", path.read_bytes())
    writer.write_teacher_file("config.json", model_config.to_json_string().encode())
    writer.commit_teacher()


class TimedBatches:
    """An iterator over the trainer's batches that adds up the time spent waiting in `next`."""

    def __init__(self, batches: Any):
        self.batches = batches
        self.wait_s = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        return batch


def trainer_steps(store: str, out: Path, losses: list[dict], device: str, batch_size: int, warmup: int, steps: int,
                  num_workers: int) -> dict[str, float]:
    """Seconds per step (median of `steps` after `warmup`) and the loader-wait share of a Trainer."""
    from pipeline.config import parse_config
    from pipeline.train.trainer import TrainConfig, Trainer

    cfg = parse_config({"store": store, "out": str(out), "student": {"init": "config"}, "losses": losses,
                        "batch_size": batch_size, "steps": 1_000_000, "warmup_steps": 0, "checkpoint_every": 1_000_000,
                        "log_every": 1_000_000, "tensorboard": False, "device": device, "num_workers": num_workers,
                        "buffer_rows": 4 * batch_size, "seed": 0}, TrainConfig)
    trainer = Trainer(cfg)
    trainer.student.model.train()
    batches = TimedBatches(trainer.batches())
    times, waits = [], []
    for i in range(warmup + steps):
        sync(trainer.device)
        before, start = batches.wait_s, time.perf_counter()
        trainer.train_step(batches)
        sync(trainer.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            waits.append(batches.wait_s - before)
    fused = trainer.fused
    del trainer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    times.sort()
    return {"step_s": times[len(times) // 2], "best_step_s": times[0], "wait_share": sum(waits) / sum(times),
            "fused": fused}


def student_figures(store: str, model_config: Any, row_length: int, device: str, args: Any, tmp: str) -> dict[str, Any]:
    from kdstore.reader import StoreReader

    reader = StoreReader(store)
    writer = StoreWriter(store, reader.meta.spec, reader.meta.provenance)
    if not writer.teacher_committed():
        write_teacher_dir(writer, model_config)
    figures: dict[str, Any] = {}
    for mode, losses in (("ce", [{"name": "ce"}]), ("kd", [{"name": "fkl"}])):
        log(f"student {mode} steps", "gpu")
        figures[mode] = trainer_steps(store, Path(tmp) / f"run-{mode}", losses, device, args.student_batch,
                                      args.warmup, args.steps, args.num_workers)
        figures[mode]["tokens_per_s"] = args.student_batch * row_length / figures[mode]["step_s"]
    figures["kd_vs_ce_step"] = figures["kd"]["step_s"] / figures["ce"]["step_s"]
    figures["data_wait_share"] = figures["kd"]["wait_share"]
    return figures


# ---------------------------------------------------------------- the loss alone


def loss_inputs(tokens: int, vocab: int, hidden: int, k: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """hidden [N, d] and head [V, d] in `dtype`, and a top-k + tail teacher batch (distinct kept ids)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 2).to(device, dtype)
    ids = (torch.randint(0, vocab, (1, tokens, 1), generator=g) + torch.arange(k) * 7919) % vocab
    lp = torch.log_softmax(2 * torch.randn(1, tokens, k + 1, generator=g), -1).sort(-1, descending=True).values
    batch = {"valid": torch.ones(1, tokens, dtype=torch.bool), "input_ids": torch.randint(0, vocab, (1, tokens), generator=g),
             "topk_ids": ids.int(), "topk_logp": lp[..., :k].contiguous(), "topk_tail": lp[..., k].exp().contiguous()}
    return h, w, {key: v.to(device) for key, v in batch.items()}


def fused_fkl(h: torch.Tensor, w: torch.Tensor, batch: dict) -> torch.Tensor:
    """kdcache's fused forward KL (top-k + tail), forward + backward; returns the loss."""
    result = DistributionLoss("fkl")(StudentOutputs(None, output_head=w, last_hidden=h[None]), batch)
    result.total.backward()
    return result.total.detach()


def reference_fkl(h: torch.Tensor, w: torch.Tensor, batch: dict, chunk: int) -> torch.Tensor:
    """The same forward KL in plain PyTorch: per chunk of tokens, logits, student log-probs over
    the kept ids and the tail bucket (log-sum-exp of the ids not kept), KL against the stored
    teacher, and that chunk's backward through autograd before the next chunk."""
    n = h.shape[0]
    ids = batch["topk_ids"][0].long()
    lt = torch.cat([batch["topk_logp"][0].float(), batch["topk_tail"][0].float().clamp_min(1e-30).log()[:, None]], -1)
    lt = lt - lt.logsumexp(-1, keepdim=True)
    total = torch.zeros((), device=h.device)
    for s in range(0, n, chunk):
        z = (h[s : s + chunk] @ w.T).float()
        norm = z.logsumexp(-1, keepdim=True)
        kept = z.gather(-1, ids[s : s + chunk]) - norm
        rest = z.scatter(-1, ids[s : s + chunk], float("-inf")).logsumexp(-1, keepdim=True) - norm
        t = lt[s : s + chunk]
        value = (t.exp() * (t - torch.cat([kept, rest], -1))).sum() / n
        value.backward()
        total += value.detach()
    return total


def measure(fn, h: torch.Tensor, w: torch.Tensor, batch: dict, device: torch.device, reps: int) -> dict[str, Any]:
    """Best wall time of `reps` runs after a warm-up, and the peak memory above the inputs (CUDA:
    max_memory_allocated; CPU: growth of the peak resident set), gradients included."""
    times, value, peak = [], None, 0.0
    for rep in range(reps + 1):
        h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
            before = (proc_status_kb("VmRSS") or 0) * 1024
        start = time.perf_counter()
        value = fn(h, w, batch)
        sync(device)
        if rep:
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
        else:
            peak = max(peak, (proc_status_kb("VmHWM") or 0) * 1024 - before)
    return {"s": min(times), "peak_gb": peak / GB, "value": float(value)}


def loss_figures(tokens: int, vocab: int, hidden: int, k: int, device: torch.device, reps: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, w, batch = loss_inputs(tokens, vocab, hidden, k, device, dtype)
    h.requires_grad_(True)
    w.requires_grad_(True)
    fused = measure(fused_fkl, h, w, batch, device, reps)
    grads = (h.grad.float().clone(), w.grad.float().clone())
    chunk = chunk_rows(vocab)
    reference = measure(lambda *a: reference_fkl(*a, chunk), h, w, batch, device, reps)
    grad_diff = max(float((h.grad.float() - grads[0]).abs().max() / grads[0].abs().max().clamp_min(1e-30)),
                    float((w.grad.float() - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-30)))
    return {"tokens": tokens, "vocab": vocab, "hidden": hidden, "k": k, "dtype": str(dtype).removeprefix("torch."),
            "inputs_gb": (h.numel() * h.element_size() + w.numel() * w.element_size()) / GB,
            "fused": fused, "reference": reference, "time_vs_reference": fused["s"] / reference["s"],
            "value_rel_diff": abs(fused["value"] - reference["value"]) / max(abs(reference["value"]), 1e-30),
            "grad_rel_diff": grad_diff, "reference_chunk_tokens": chunk}

