"""Response-only losses: a chat store's loss_mask, folded by the trainer, restricts KD and CE to
the assistant's tokens (checked against dense float64 references), end to end through the
trainer; what cannot honour the mask refuses chat stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train.losses import StudentOutputs, fold_loss_mask
from pipeline.train.losses.output import CrossEntropyLoss, DistributionLoss
from pipeline.train.trainer import Trainer, train
from tests.chat_docs import cache_chat, write_chat_corpus
from tests.pipeline.train.losses.loss_batches import V, make_case

B, T = 2, 5


def _masked_case():
    teacher, student, batch = make_case(V, invalid_tail=1)  # k = V: the KD loss is the dense KL
    loss_mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)  # the tokens to learn
    return teacher, student.requires_grad_(True), {**batch, "loss_mask": loss_mask & batch["valid"]}


def test_fold_puts_the_mask_on_the_predicting_position():
    _, _, batch = _masked_case()
    target = fold_loss_mask(batch)["target_mask"]
    # position t predicts token t+1: it counts when token t+1 is to be learned; the last never does
    assert target.tolist() == [[True, True, False, True, False], [False, True, True, False, False]]
    assert fold_loss_mask({"valid": batch["valid"]}) == {"valid": batch["valid"]}


def test_kd_and_ce_count_assistant_tokens_only_against_dense_references():
    teacher, student, batch = _masked_case()
    folded = fold_loss_mask(batch)
    counted = [(b, t) for b in range(B) for t in range(T - 1) if batch["loss_mask"][b, t + 1]]
    # forward KL (teacher ‖ student), dense, over the counted positions
    fkl = DistributionLoss("fkl")(StudentOutputs(student), folded).total
    s_logp = torch.log_softmax(student, -1)
    ref = torch.stack([(teacher[b, t].exp() * (teacher[b, t] - s_logp[b, t])).sum() for b, t in counted]).mean()
    (g_got,) = torch.autograd.grad(fkl, student)
    (g_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(fkl, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(g_got, g_ref, atol=1e-9, rtol=0)
    # hard-label CE: position t against input_ids[t+1], same positions
    ce = CrossEntropyLoss()(StudentOutputs(student), folded).total
    ids = batch["input_ids"]
    s_logp = torch.log_softmax(student, -1)
    ref_ce = torch.stack([-s_logp[b, t, ids[b, t + 1]] for b, t in counted]).mean()
    (g_got,) = torch.autograd.grad(ce, student)
    (g_ref,) = torch.autograd.grad(ref_ce, student)
    torch.testing.assert_close(ce, ref_ce, atol=1e-9, rtol=0)
    torch.testing.assert_close(g_got, g_ref, atol=1e-9, rtol=0)


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("chat_trainer")
    return cache_chat(root / "store", tiny_teacher_dir, write_chat_corpus(root))


def _cfg(store: Path, out: Path, teacher: Path, **over) -> dict:
    data = {"store": str(store), "out": str(out),
            "student": {"init": "teacher_layers", "teacher": str(teacher), "num_layers": 1},
            "losses": [{"name": "fkl"}, {"name": "ce", "weight": 0.5}], "batch_size": 2, "steps": 2,
            "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 100, "device": "cpu", "tensorboard": False}
    data.update(over)
    return data


def test_trainer_step_equals_the_losses_on_the_masked_batch(chat_store, tiny_teacher_dir, tmp_path):
    trainer = Trainer(_parse(_cfg(chat_store, tmp_path / "run", tiny_teacher_dir)))
    assert "loss_mask" in trainer.stream.fields
    batch = next(iter(trainer.loader))
    assert batch["loss_mask"].any() and not batch["loss_mask"][~batch["valid"]].any()
    with torch.no_grad():
        logits = trainer.student.model(input_ids=batch["input_ids"]).logits.double()
        folded = fold_loss_mask(batch)
        want = DistributionLoss("fkl")(StudentOutputs(logits), folded).total
        unmasked = DistributionLoss("fkl")(StudentOutputs(logits), batch).total
    assert not torch.isclose(want, unmasked)
    got = trainer.loss(StudentOutputs(logits.float()), folded).components["fkl"]
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    result = train(_cfg(chat_store, tmp_path / "run2", tiny_teacher_dir), progress=False)
    assert result["steps"] == 2 and result["last"]["fkl"] > 0


def test_cross_tokenizer_student_refuses_a_chat_store(chat_store, tiny_teacher_dir, tmp_path):
    cfg = _cfg(chat_store, tmp_path / "run", tiny_teacher_dir,
               student={"init": "teacher_layers", "teacher": str(tiny_teacher_dir), "num_layers": 1,
                        "tokenizer": str(tiny_teacher_dir)},
               losses=[{"name": "ce"}])
    with pytest.raises(ValueError, match="chat store .*own tokenizer cannot carry that mask"):
        Trainer(_parse(cfg))


def _parse(data: dict):
    from pipeline.config import parse_config
    from pipeline.train.trainer import TrainConfig

    return parse_config(data, TrainConfig)


def test_multi_teacher_join_of_chat_stores_honours_the_mask(chat_store, tiny_teacher_dir, make_tiny_teacher,
                                                            smollm2_tokenizer, tmp_path):
    from kdstore.reader import StoreReader

    corpus = Path(StoreReader(str(chat_store)).meta.provenance.corpus["paths"][0])
    other = cache_chat(tmp_path / "b", make_tiny_teacher(tmp_path / "t2", smollm2_tokenizer, seed=1), corpus)
    trainer = Trainer(_parse(_cfg(chat_store, tmp_path / "run", tiny_teacher_dir, extra_stores=[str(other)],
                                  losses=[{"name": "multi_teacher", "weights": [0.5, 0.5]}])))
    batch = next(iter(trainer.loader))
    assert "loss_mask" in batch and "t1/topk_ids" in batch
    with torch.no_grad():
        logits = 3 * torch.randn(*batch["input_ids"].shape, trainer.student.model.config.vocab_size,
                                 generator=torch.Generator().manual_seed(0))  # far from both teachers
        masked = trainer.loss(StudentOutputs(logits), fold_loss_mask(batch)).total
        unmasked = trainer.loss(StudentOutputs(logits), batch).total
        # by hand: each teacher's fkl over the assistant positions, weighted
        folded = fold_loss_mask(batch)
        view = {k.removeprefix("t1/"): v for k, v in folded.items() if k.startswith("t1/")}
        fkl = DistributionLoss("fkl")
        want = 0.5 * fkl(StudentOutputs(logits), folded).total + 0.5 * fkl(StudentOutputs(logits), {**folded, **view}).total
    assert not torch.isclose(masked, unmasked)
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=1e-5)
