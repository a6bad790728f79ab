"""The training core shared by `kdcache train` (`Trainer`) and the Hugging Face `KDTrainer`: both
hand the losses the same prepared batch for the same rows (chat store, multi-teacher store), the
HF path honours a chat store's loss mask and runs fused, both take the same steps (rel 1e-5,
float32, 5 steps, fused and not, plain and chat store), and bad input stops before step 1."""

from __future__ import annotations

import copy
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from kdstore.reader import StoreReader
from pipeline.config import ConfigError
from pipeline.train.hf_trainer import KDCollator, KDTrainer, StoreRows, kd_fields
from pipeline.train.losses import StoreInfo, StudentDims, StudentOutputs, build_loss, fold_loss_mask
from pipeline.train.student import StudentConfig, build_student
from pipeline.train.trainer import TrainConfig, Trainer, lr_factor, make_optimizer, train
from tests.chat_docs import cache_chat, write_chat_corpus
from tests.pipeline.train.test_multi_teacher import _perturbed

LOSSES = [{"name": "fkl"}, {"name": "ce", "weight": 0.5}]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher_dir, smollm2_tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("core_stores")
    docs = write_short_docs(root)
    other = _perturbed(tiny_teacher_dir, root / "t1", smollm2_tokenizer)
    return {"plain": str(cache_short_docs(root / "plain", tiny_teacher_dir, docs, split="all")),
            "t1": str(cache_short_docs(root / "t1store", other, docs, split="all", signals={"topk": {"k": 6}})),
            "chat": str(cache_chat(root / "chat", tiny_teacher_dir, write_chat_corpus(root)))}


def _cfg(store: str, out: Path, teacher: Path, steps: int = 5, **over) -> TrainConfig:
    data = {"store": store, "out": str(out), "losses": LOSSES, "batch_size": 2, "steps": steps, "lr": 1e-3,
            "warmup_steps": 2, "clip": 1.0, "device": "cpu", "tensorboard": False, "checkpoint_every": 100,
            "student": {"init": "teacher_layers", "teacher": str(teacher), "num_layers": 1}}
    return TrainConfig(**{**data, **over})


def _hf(cfg: TrainConfig, out: Path, losses=LOSSES, extra: tuple[str, ...] = (), **kd) -> KDTrainer:
    """A KDTrainer set up as `cfg`'s Trainer: same init, batches (seed, batch size), AdamW and schedule."""
    from transformers import TrainingArguments

    reader = StoreReader(cfg.store)
    torch.manual_seed(cfg.seed)
    model = build_student(StudentConfig(**cfg.student.model_dump()), reader, False, "cpu").model
    optimizer = make_optimizer(list(model.parameters()), cfg)  # the Trainer's AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    args = TrainingArguments(output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                             max_grad_norm=cfg.clip, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0)
    rows = StoreRows(reader, kd_fields(reader, losses, model, extra), seed=cfg.seed, buffer_rows=cfg.buffer_rows,
                     joined=extra)
    return KDTrainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, scheduler),
                     kd_store=reader, kd_losses=losses, kd_extra_stores=extra, **kd)


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _captured(loss: torch.nn.Module) -> list[dict]:
    """The batches `loss` is called with (a forward pre-hook on the real module)."""
    seen: list[dict] = []
    loss.register_forward_pre_hook(lambda _m, args: seen.append({k: v for k, v in args[1].items()}))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chat", "multi"])
def test_both_trainers_hand_the_losses_the_same_batch(stores, tiny_teacher_dir, tmp_path, kind):
    losses = LOSSES if kind == "chat" else [{"name": "multi_teacher", "weights": [0.5, 0.5]}]
    extra = (stores["t1"],) if kind == "multi" else ()
    store = stores["chat" if kind == "chat" else "plain"]
    cfg = _cfg(store, tmp_path / "ours", tiny_teacher_dir, steps=2, losses=losses, extra_stores=list(extra))
    ours = Trainer(cfg)
    mine = _captured(ours.loss)
    batches = ours.batches()
    for _ in range(2):
        ours.train_step(batches)
    hf = _hf(cfg, tmp_path / "hf", losses, extra)
    theirs = _captured(hf.kd.loss)
    hf.train()
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs, strict=True):
        assert sorted(a) == sorted(b)
        assert ("target_mask" in a) is (kind == "chat") and ("t1/topk_ids" in a) is (kind == "multi")
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_kd_trainer_trains_the_assistant_tokens_only(stores, tiny_teacher_dir, tmp_path):
    """On a chat store the HF path's first loss is the loss over the assistant's tokens (dense
    float64 reference from the same initial student), not the loss over every token."""
    cfg = _cfg(stores["chat"], tmp_path / "ours", tiny_teacher_dir, steps=1)
    reader = StoreReader(stores["chat"])
    hf = _hf(cfg, tmp_path / "hf")
    start = copy.deepcopy(hf.model).double()
    hf.train()
    ids = hf.kd_sample_ids[0]
    rows = {int(r["sample_id"]): r for r in StoreRows(reader, ["topk_ids", "topk_logp", "topk_tail", "loss_mask"])}
    batch = KDCollator()([rows[i] for i in ids])
    with torch.no_grad():
        logits = start(input_ids=batch["input_ids"]).logits
    loss = build_loss(LOSSES, StoreInfo.of(reader), StudentDims.from_config(start.config)).double()
    masked = loss(StudentOutputs(logits), fold_loss_mask(batch)).components
    every = loss(StudentOutputs(logits), {k: v for k, v in batch.items() if k != "loss_mask"}).components
    print({k: (float(masked[k]), float(every[k])) for k in masked})
    assert abs(float(masked["ce"]) / float(every["ce"]) - 1) > 1e-4  # the mask matters here (10× the tolerance)
    assert hf.kd_history[0]["ce"] == pytest.approx(float(masked["ce"]), rel=1e-5)
    # fkl ≈ 3e-6 here (a student cut from the teacher): float32 resolves it to ~1e-7
    assert hf.kd_history[0]["fkl"] == pytest.approx(float(masked["fkl"]), rel=1e-5, abs=5e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "chat"])
@pytest.mark.parametrize("fused", [True, False])
def test_kd_trainer_takes_the_same_steps_as_kdcache_train(stores, tiny_teacher_dir, tmp_path, kind, fused):
    cfg = _cfg(stores[kind], tmp_path / "ours", tiny_teacher_dir, fused_loss=fused)
    train(cfg, progress=False)
    ours = _log(tmp_path / "ours")
    hf = _hf(cfg, tmp_path / "hf", fused_loss=fused)
    assert hf.kd.fused is fused
    hf.train()
    assert hf.kd_sample_ids == [e["sample_ids"] for e in ours]  # the same batches
    for got, want in zip(hf.kd_history, ours, strict=True):
        for key in ("loss", "fkl", "ce"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=0), (key, got, want)
    assert any("kd/fkl" in entry for entry in hf.state.log_history)


def test_bad_input_is_refused_before_the_first_step(stores, tiny_teacher_dir, tmp_path, smollm2_tokenizer):
    from transformers import AutoTokenizer, TrainingArguments

    reader = StoreReader(stores["plain"])
    rows = reader.num_rows()
    with pytest.raises(ConfigError, match=rf"at most {rows // 2} steps"):  # Trainer: steps past rows × epochs
        Trainer(_cfg(stores["plain"], tmp_path / "a", tiny_teacher_dir, steps=rows // 2 + 1, epochs=1))
    assert not (tmp_path / "a").exists()
    Trainer(_cfg(stores["plain"], tmp_path / "b", tiny_teacher_dir, steps=rows // 2, epochs=1))  # fits
    model = build_student(StudentConfig(teacher=str(tiny_teacher_dir), num_layers=1), reader).model
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=rows + 1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match=r"2 epoch\(s\)"):
        KDTrainer(model=model, args=args, kd_store=reader, kd_losses=LOSSES, kd_epochs=2)
    with pytest.raises(Exception, match="adversarial.*kdcache train"):
        KDTrainer(model=model, args=args, kd_store=reader,
                  kd_losses=[{"name": "fkl"}, {"name": "adversarial", "weight": 0.1, "feature": "output"}])
    with pytest.raises(Exception, match=r"loss 'hidden' needs store field"):
        KDTrainer(model=model, args=args, kd_store=reader, kd_losses=[{"name": "hidden"}])
    other = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    other.add_tokens(["<not-in-the-store>"])
    with pytest.raises(Exception, match="tokenizer digest"):
        KDTrainer(model=model, args=args, kd_store=reader, kd_losses=LOSSES, processing_class=other)
    chat = StoreReader(stores["chat"])
    with pytest.raises(ConfigError, match=r"reads no \['topk_tail'\]"):  # a dataset missing a field the loss reads
        KDTrainer(model=model, args=args, kd_store=chat, kd_losses=LOSSES,
                  train_dataset=StoreRows(chat, ["topk_ids", "topk_logp"]))
    assert "loss_mask" in StoreRows(chat, ["topk_ids"]).fields  # a chat store's rows always carry their mask


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts host reads of device values (`item`, `float()`, `bool()`, `int()`, `tolist`, `cpu`):
    on a GPU each one waits for the device. On this CPU machine "device values" are traced: the
    student's and the loss's parameters and gradients, what `.to(device)` or a factory with a
    `device=` returns (the batch after its move, the losses' buffers), and everything computed from
    them. Not counted: the loader's CPU batch (counted before the move), AdamW's step counters (host
    tensors by torch's design: `skip`), and transformers' own packed-sequence check in its mask
    preparation (`masking_utils`, one `bool()` per forward without an attention mask: not ours)."""

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu"}

    def __init__(self, params, where, skip=lambda t: False):
        super().__init__()
        self.skip = skip
        self.traced: dict[int, Any] = {}
        self.reads: list[tuple[str, int]] = []  # (what, where() at the read)
        self.where = where
        for p in params:
            self._trace(p)
            p.register_post_accumulate_grad_hook(lambda q: self._trace(q.grad))

    def _trace(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.traced[id(t)] = weakref.ref(t)

    def _is_traced(self, t) -> bool:
        ref = self.traced.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in (*args, *kwargs.values()) for a in (a if isinstance(a, list | tuple) else (a,))]
        traced = any(self._is_traced(a) for a in flat)
        name = getattr(func, "__name__", "")
        if traced and name in self.READS and not self.skip(args[0]) and not _from_transformers_masks():
            self.reads.append((name, self.where()))
        out = func(*args, **kwargs)
        if traced or name == "to" or kwargs.get("device") is not None:
            for o in out if isinstance(out, list | tuple) else (out,):
                self._trace(o)
        return out


def _from_transformers_masks() -> bool:
    frame = sys._getframe(2)
    while frame is not None and "/torch/" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.endswith("transformers/masking_utils.py")


@pytest.mark.parametrize("fused", [True, False])
def test_steps_between_log_steps_read_nothing_from_the_device(stores, tiny_teacher_dir, tmp_path, fused):
    cfg = _cfg(stores["plain"], tmp_path / "run", tiny_teacher_dir, steps=4, log_every=4, fused_loss=fused)
    trainer = Trainer(cfg)
    assert trainer.fused is fused
    reads = HostReads([*trainer.student.model.parameters(), *trainer.loss.parameters()], lambda: trainer.step,
                      skip=lambda t: any(t is s.get("step") for s in trainer.optimizer.state.values()))
    with reads:
        trainer.train(progress=False)
    # steps 1-4 run while trainer.step is 0-3; the log is read (once) after step 4
    assert [r for r in reads.reads if r[1] < 4] == [] and ("tolist", 4) in reads.reads, reads.reads
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(e["loss"] > 0 and len(e["sample_ids"]) == 2 for e in log)


def test_hidden_through_a_wrapper_is_the_last_hidden_state(tiny_teacher_dir):
    """Accelerate's DDP wraps the whole LM: the fused forward goes through the wrapper (which syncs
    gradients) and still gives the last hidden state, the head restored after the call."""
    from transformers import AutoModelForCausalLM

    from pipeline.train.core import HiddenThrough, fused_forward

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    head = model.get_output_embeddings()
    ids = torch.arange(12)[None] % 100
    through = HiddenThrough(Wrapper(model), model)(ids)
    assert through.shape == (1, 12, model.config.hidden_size)
    torch.testing.assert_close(through, fused_forward(model)(ids), rtol=0, atol=0)
    assert model.get_output_embeddings() is head
