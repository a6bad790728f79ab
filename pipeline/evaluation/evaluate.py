"""Evaluation: the teacher, any number of students and a baseline, side by side, on held-out rows.

Held-out rows are the documents the store's own corpus split holds out (assigned by content hash,
so no cached training row holds them): `split` picks validation (for choices), test (for reported
figures) or held_out (both, the default), packed exactly as the store was, with the store's
tokenizer. Every model sees the same rows in the same batches, with the teacher computed
once per batch, so per-token metrics are paired:

* perplexity per token, document-aware: position t counts when t and t+1 are valid and belong to
  the same document (the token after a document's EOS is not predictable from it);
* KL(teacher ‖ model) over the full vocabulary and top-1 agreement with the teacher's argmax;
* expected calibration error of the top-1 prediction against the real next token;
* greedy (or seeded, sampled) continuations of held-out prompts scored against the teacher's
  continuations and the real text (BLEU, chrF, TER, ROUGE-L, CER; `pipeline.evaluation.metrics`);
* bits per UTF-8 byte of the predicted text, the one figure comparable across tokenizers.

A chat store (one with a `loss_mask`): every per-token metric counts the assistant's tokens only
(position t counts when token t+1 is in the mask), and the generation scores are the replies to
held-out conversation prompts against the reference responses and the teacher's replies
(`pipeline.evaluation.chat_eval`). Students with their own tokenizer are refused there.

A student with its own tokenizer (cross-tokenizer distillation) is evaluated on the same held-out
documents packed with its tokenizer: perplexity (per its own tokens: compare it with a baseline
of the same tokenizer), bits per byte, accuracy and ECE; KL and agreement to the teacher and the
generation scores need the teacher's vocabulary and are left out for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from kdstore.reader import StoreReader
from pipeline.config import CacheConfig, CorpusConfig, Strict
from pipeline.evaluation.decoding import decode_runs, describe, generate_options, scores_over_runs
from pipeline.evaluation.metrics import calibration_bins, expected_calibration_error

TEACHER = "teacher"
HELD_OUT_SPLITS = ("validation", "test", "held_out")


class GenerationConfig(Strict):
    prompts: int = Field(8, ge=1)
    prompt_tokens: int = Field(32, ge=1)  # chat stores: the longest prompt (conversation so far) taken
    new_tokens: int = Field(32, ge=1)
    reference_tokens: int | None = Field(None, ge=1)  # chat stores: only references (responses) up to this long
    # none: greedy; else one sampled reply per seed (temperature 1, top-p 1), scores averaged over
    # the seeds (the DSKD protocol: seeds 10, 20, 30, 40, 50)
    seeds: list[int] = []

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"generation.seeds {seeds}: a repeated seed repeats its run; give distinct seeds")
        return seeds


class EvalConfig(Strict):
    store: str  # held-out rows come from this store's corpus and packing, with its tokenizer
    out: str
    models: dict[str, str] = Field(min_length=1)  # name → model folder (a student's `model/`)
    baseline: str | None = None  # one of `models`: the CE-only student the others are compared with
    teacher: str | None = "default"  # the store's teacher (checked by digest); None: no teacher metrics
    train_logs: dict[str, str] = {}  # name → train_log.jsonl, for training curves in the report
    max_tokens: int = Field(4096, ge=2)
    # which held-out documents: validation (choose with it), test (report it) or held_out (both)
    split: Literal["validation", "test", "held_out"] = "held_out"
    batch_size: int = Field(4, ge=1)
    generation: GenerationConfig | None = GenerationConfig()
    ece_bins: int = Field(15, ge=1)
    device: str = "auto"


class EvalError(ValueError):
    """The evaluation cannot be run as configured (names what and where)."""


@dataclass(frozen=True)
class HeldOut:
    input_ids: np.ndarray  # [N, T] int64
    doc_ids: np.ndarray  # [N, T]
    valid: np.ndarray  # [N, T] bool
    loss_mask: np.ndarray | None = None  # [N, T] bool, chat stores: the tokens that count

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


def heldout_rows(reader: StoreReader, tokenizer: Any, max_tokens: int, split: str = "held_out") -> HeldOut:
    """The rows of the store's corpus in held-out `split` (validation, test or held_out), packed as
    the store's rows were."""
    if split not in HELD_OUT_SPLITS:
        raise EvalError(f"evaluation split {split!r}: expected one of {HELD_OUT_SPLITS}")
    from pipeline.capture.shard_plan import plan_shards

    prov = reader.meta.provenance
    packing = prov.packing
    if packing.get("split") != "train":
        raise EvalError(
            f"store {reader.location.url!r} was cached with split {packing.get('split')!r}: its rows may include "
            "every document, so none is held out; cache with `split: train` (validation documents stay out)")
    if not packing.get("val_fraction"):
        raise EvalError(f"store {reader.location.url!r} was cached with val_fraction 0: no held-out documents")
    corpus = CorpusConfig(**prov.corpus, max_documents=packing.get("max_documents"))
    config = CacheConfig(store=reader.location.url, corpus=corpus, row_length=int(packing["row_length"]),
                         shard_rows=reader.spec.shard_rows, split=split, max_tokens=max_tokens)
    plans = plan_shards(config, tokenizer)
    if not plans:
        raise EvalError(f"the corpus of store {reader.location.url!r} has no {split} documents")
    rows = [p.rows for p in plans]
    ids = np.concatenate([r.input_ids for r in rows]).astype(np.int64)
    n = max(1, -(-max_tokens // ids.shape[1]))
    loss_mask = np.concatenate([r.loss_mask for r in rows])[:n] if rows[0].loss_mask is not None else None
    return HeldOut(ids[:n], np.concatenate([r.doc_ids for r in rows])[:n], np.concatenate([r.valid for r in rows])[:n],
                   loss_mask)


def predicted_mask(doc_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: position t predicts token t+1 inside one document."""
    return valid[:, :-1] & valid[:, 1:] & (doc_ids[:, :-1] == doc_ids[:, 1:])


@dataclass
class TokenStats:
    """Running sums over counted positions for one model."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0
    confidence: list[np.ndarray] | None = None
    correct: list[np.ndarray] | None = None

    bytes: int = 0

    def add(self, logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
            teacher_logp: torch.Tensor | None, label_bytes: torch.Tensor) -> None:
        lp = logp[mask]
        y = labels[mask]
        self.nll += float(-lp.gather(-1, y[:, None]).sum())
        self.bytes += int(label_bytes[y].sum())
        conf, pred = lp.max(-1)
        if teacher_logp is not None:
            lt = teacher_logp[mask]
            self.kl += float((lt.exp() * (lt - lp)).sum())
            self.agree += int((pred == lt.argmax(-1)).sum())
        self.count += int(mask.sum())
        self.confidence = (self.confidence or []) + [conf.exp().numpy()]
        self.correct = (self.correct or []) + [(pred == y).numpy()]

    def metrics(self, bins: int, with_teacher: bool) -> dict[str, Any]:
        conf = np.concatenate(self.confidence or [np.empty(0)])
        correct = np.concatenate(self.correct or [np.empty(0, bool)])
        out: dict[str, Any] = {
            "tokens": self.count,
            "nll": self.nll / self.count,
            "ppl": float(np.exp(self.nll / self.count)),
            "bits_per_byte": self.nll / np.log(2) / max(1, self.bytes),
            "bytes": self.bytes,
            "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(conf, correct, bins),
            "calibration": _json_safe(calibration_bins(conf, correct, bins)),
        }
        if with_teacher:
            out["kl_to_teacher"] = self.kl / self.count
            out["top1_agreement"] = self.agree / self.count
        return out


def _json_safe(bins: dict[str, Any]) -> dict[str, Any]:
    """Empty bins hold NaN; JSON has no NaN, so they become null."""
    return {k: [None if isinstance(x, float) and np.isnan(x) else x for x in v] if isinstance(v, list) else v
            for k, v in bins.items()}


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(path: str, name: str, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise EvalError(f"model {name!r}: folder {path!r} does not exist (a trained student's model/ folder)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def load_models(cfg: EvalConfig, reader: StoreReader,
                device: torch.device) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The teacher first (when asked for: checked against the store's digests), then the students.
    Returns the models, each one's tokenizer (one shared object per distinct tokenizer, so models
    that tokenise alike are evaluated on the same rows) and the store's tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.capture.teacher import load_teacher, tokenizer_digest
    from pipeline.capture.teacher_files import store_tokenizer

    if cfg.baseline is not None and cfg.baseline not in cfg.models:
        raise EvalError(f"baseline {cfg.baseline!r} is not one of models {sorted(cfg.models)}")
    if TEACHER in cfg.models:
        raise EvalError(f"{TEACHER!r} is reserved for the teacher; rename that model")
    tokenizer = store_tokenizer(reader)
    models: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    by_digest = {tokenizer_digest(tokenizer): tokenizer}
    if cfg.teacher is not None:
        loaded = load_teacher(cfg.teacher, device=str(device), dtype="float32")
        want = reader.meta.provenance.teacher.get("weights_sha256")
        if want is not None and loaded.digests.weights_sha256 != want:
            raise EvalError(f"teacher {cfg.teacher!r} has weights digest {loaded.digests.weights_sha256[:16]}…, "
                            f"store {reader.location.url!r} was made by {want[:16]}…: KL to teacher would be to "
                            "another model; name the store's teacher")
        models[TEACHER], tokenizers[TEACHER] = loaded.model, tokenizer
    for name, path in cfg.models.items():
        models[name] = load_model(path, name, device)
        own = AutoTokenizer.from_pretrained(path, local_files_only=True)
        vocab = models[name].get_output_embeddings().weight.shape[0]
        if len(own) > vocab:
            raise EvalError(f"model {name!r} ({path}): its tokenizer has {len(own):,} ids, its vocabulary {vocab:,}")
        tokenizers[name] = by_digest.setdefault(tokenizer_digest(own), own)
    return models, tokenizers, tokenizer


def token_bytes(tokenizer: Any) -> torch.Tensor:
    """[V] UTF-8 bytes of each id's text (special tokens 0). Byte-level BPE tokens are spelled one
    character per byte; other tokenizers are measured on their decoded text."""
    from pipeline.train.cross_tokenizer import token_texts

    special = set(tokenizer.all_special_ids)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        sizes = [len(t or "") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    else:
        sizes = [len(t.encode("utf-8")) for t in token_texts(tokenizer)]
    return torch.tensor([0 if i in special else n for i, n in enumerate(sizes)], dtype=torch.long)


@torch.inference_mode()
def token_metrics(models: dict[str, Any], rows: HeldOut, batch_size: int, bins: int,
                  device: torch.device, label_bytes: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Metrics of models sharing one tokenizer (and `rows`, packed with it); KL and agreement
    when the teacher is among them."""
    stats = {name: TokenStats() for name in models}
    with_teacher = TEACHER in models
    for start in range(0, len(rows.input_ids), batch_size):
        ids = torch.from_numpy(rows.input_ids[start:start + batch_size])
        mask = predicted_mask(torch.from_numpy(rows.doc_ids[start:start + batch_size]),
                              torch.from_numpy(rows.valid[start:start + batch_size]))
        if rows.loss_mask is not None:  # chat: the assistant's tokens only (the predicted token's mask)
            mask &= torch.from_numpy(rows.loss_mask[start:start + batch_size, 1:])
        labels = ids[:, 1:]
        teacher_logp = None
        for name, model in models.items():
            logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1].float().cpu()
            logp = torch.log_softmax(logits, dim=-1)
            if name == TEACHER:
                teacher_logp = logp
            stats[name].add(logp, labels, mask, teacher_logp, label_bytes)
    if not any(s.count for s in stats.values()):
        raise EvalError("the held-out rows have no predictable positions")
    return {name: s.metrics(bins, with_teacher) for name, s in stats.items()}


def prompt_windows(rows: HeldOut, prompt_tokens: int, new_tokens: int, count: int) -> list[tuple[int, int]]:
    """(row, start) of up to `count` windows of prompt + continuation inside one document, one per
    document where possible, spread over the held-out rows (deterministic)."""
    span = prompt_tokens + new_tokens
    windows: list[tuple[int, int]] = []
    used_docs: set[tuple[int, int]] = set()
    for r in range(len(rows.input_ids)):
        t = 0
        while t + span <= rows.input_ids.shape[1] and len(windows) < count:
            doc = rows.doc_ids[r, t]
            window_ok = rows.valid[r, t:t + span].all() and (rows.doc_ids[r, t:t + span] == doc).all()
            if window_ok and (r, doc) not in used_docs:
                windows.append((r, t))
                used_docs.add((r, int(doc)))
                t += span
            else:
                t += 1 if not window_ok else span
    return windows


@torch.inference_mode()
def generation_metrics(models: dict[str, Any], tokenizer: Any, rows: HeldOut, cfg: GenerationConfig,
                       device: torch.device) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """Continuations per model (greedy, or once per seed), scored against the real text and the
    teacher's continuation of the same run; scores are averaged over the runs."""
    windows = prompt_windows(rows, cfg.prompt_tokens, cfg.new_tokens, cfg.prompts)
    if not windows:
        raise EvalError(f"no held-out document has {cfg.prompt_tokens + cfg.new_tokens} tokens for a prompt + "
                        "continuation; lower generation.prompt_tokens / new_tokens")
    prompts = torch.tensor(np.stack([rows.input_ids[r, t:t + cfg.prompt_tokens] for r, t in windows]))
    real = [tokenizer.decode(rows.input_ids[r, t + cfg.prompt_tokens:t + cfg.prompt_tokens + cfg.new_tokens],
                             skip_special_tokens=True) for r, t in windows]
    runs: list[dict[str, list[str]]] = []
    for seed in decode_runs(cfg.seeds):
        texts: dict[str, list[str]] = {}
        for name, model in models.items():
            out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                 max_new_tokens=cfg.new_tokens, pad_token_id=tokenizer.eos_token_id,
                                 **generate_options(seed))
            texts[name] = tokenizer.batch_decode(out[:, cfg.prompt_tokens:].cpu(), skip_special_tokens=True)
        runs.append(texts)
    samples = [{"prompt": tokenizer.decode(prompts[i], skip_special_tokens=True), "reference": real[i],
                **{name: runs[0][name][i] for name in runs[0]}} for i in range(len(windows))]
    return scores_over_runs(runs, real, TEACHER), samples


def chat_generation(reader: StoreReader, models: dict[str, Any], tokenizer: Any, cfg: GenerationConfig,
                    device: torch.device, split: str = "held_out") -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    from pipeline.evaluation.chat_eval import chat_generation_metrics, heldout_prompts

    prompts = heldout_prompts(reader, tokenizer, cfg.prompts, cfg.prompt_tokens, cfg.reference_tokens, split)
    if not prompts:
        raise EvalError(f"no held-out conversation of store {reader.location.url!r} has a prompt of at most "
                        f"{cfg.prompt_tokens} tokens; raise generation.prompt_tokens")
    return chat_generation_metrics(models, tokenizer, prompts, cfg.new_tokens, device, TEACHER, cfg.seeds)


def evaluate(cfg: EvalConfig, progress: Any = print) -> dict[str, Any]:
    """Metrics of every model as one JSON-able dict (the report is written by `pipeline.evaluation.report`)."""
    device = _device(cfg.device)
    reader = StoreReader(cfg.store)
    models, tokenizers, store_tokenizer = load_models(cfg, reader, device)
    if reader.spec.loss_mask and (other := [n for n in models if tokenizers[n] is not store_tokenizer]):
        raise EvalError(f"model {other[0]!r} has its own tokenizer: a chat store's assistant-token metrics need the "
                        f"store's tokenizer (and its chat template)")
    groups: dict[int, list[str]] = {}  # models by tokenizer, the store's first: each group is packed with its own
    for name in sorted(models, key=lambda n: tokenizers[n] is not store_tokenizer):
        groups.setdefault(id(tokenizers[name]), []).append(name)
    results: dict[str, Any] = {}
    heldout: list[HeldOut] = []
    for names in groups.values():
        tokenizer = tokenizers[names[0]]
        heldout.append(heldout_rows(reader, tokenizer, cfg.max_tokens, cfg.split))
        if progress:
            progress(f"evaluating {', '.join(names)} on {heldout[-1].tokens:,} {cfg.split} tokens "
                     f"({len(heldout[-1].input_ids)} rows)")
        results.update(token_metrics({n: models[n] for n in names}, heldout[-1], cfg.batch_size, cfg.ece_bins,
                                     device, token_bytes(tokenizer)))
    store_names = [n for n in models if tokenizers[n] is store_tokenizer]
    rows = heldout[0]
    samples: list[dict[str, str]] = []
    if cfg.generation is not None and store_names:
        if progress:
            what = "replies to" if reader.spec.loss_mask else "continuations of"
            progress(f"{describe(cfg.generation.seeds)}: {what} {cfg.generation.prompts} held-out prompts "
                     f"({'up to ' if reader.spec.loss_mask else ''}{cfg.generation.prompt_tokens} + "
                     f"{cfg.generation.new_tokens} tokens)")
        if reader.spec.loss_mask:
            scores, samples = chat_generation(reader, {n: models[n] for n in store_names}, store_tokenizer,
                                              cfg.generation, device, cfg.split)
        else:
            scores, samples = generation_metrics({n: models[n] for n in store_names}, store_tokenizer, rows,
                                                 cfg.generation, device)
        for name, s in scores.items():
            results[name]["generation"] = s
    return {"store": cfg.store, "split": cfg.split, "chat": bool(reader.spec.loss_mask),
            "heldout_tokens": int(rows.loss_mask.sum()) if rows.loss_mask is not None else rows.tokens, "heldout_rows": len(rows.input_ids),
            "baseline": cfg.baseline, "models": results, "samples": samples,
            "decoding": describe(cfg.generation.seeds) if cfg.generation is not None else None,
            "own_tokenizer": sorted(n for n in models if n not in store_names),
            "paths": {TEACHER: cfg.teacher, **cfg.models}}
