"""Cross-tokenizer distillation from the cache: row text in the store, re-tokenisation and position
alignment, vocabulary maps, the two losses against dense references, training and evaluation of
a student whose tokenizer is trained here, and bad input.

One module-scoped store: the tiny random teacher (SmolLM2 tokenizer) over 40 short documents
(`short_docs`), split train (val_fraction 0.3), rows of 32 tokens, top-8 + hidden_2 + text. The student tokenizer
is a byte-level BPE of 400 ids trained on the store's training documents.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from rapidfuzz.distance import Levenshtein
from short_docs import cache_short_docs as _cache
from short_docs import write_short_docs

from kdstore.reader import StoreReader
from kdstore.spec import Provenance, StoreSpec, TopKSpec, fingerprint
from kdstore.torch_stream import KDStream
from pipeline.capture.packing import pack_file
from pipeline.capture.teacher_files import store_tokenizer
from pipeline.config import ConfigError, parse_config
from pipeline.evaluation.evaluate import EvalConfig, evaluate, heldout_rows, predicted_mask
from pipeline.train.cross_tokenizer import (
    CrossTokenizerError,
    Retokenizer,
    retokenizer,
    token_texts,
    vocab_map,
)
from pipeline.train.losses import (
    LossConfigError,
    MissingLossFieldError,
    StudentOutputs,
    build_loss,
    check_cross_tokenizer,
)
from pipeline.train.losses.cross_tokenizer import (
    CMAConfig,
    CrossModelAttentionKD,
    TokenAlignKD,
    _softmax,
)
from pipeline.train.losses.output import DistributionLoss
from pipeline.train.student_tokenizer import train_store_tokenizer, training_documents
from pipeline.train.trainer import TrainConfig, Trainer, train

DOCS_WITH_UNICODE = ["Hello  world, émigré café naïve 日本語 text.\n\nSecond para  ", "  leading and trailing   ",
                     "x" * 120 + " end"]
# the plain module: τ = 1, no student CE (kd_rate null), the plain teacher values
PLAIN_CMA = CMAConfig(temperature=1.0, retemper=False, kd_rate=None, target_values=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_short_docs(tmp_path_factory.mktemp("xtok_corpus"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, corpus) -> Path:
    return _cache(tmp_path_factory.mktemp("xtok_store") / "store", tiny_teacher_dir, corpus,
                  signals={"topk": {"k": 8}, "hidden": {"layers": [2]}, "text": True})


@pytest.fixture(scope="module")
def student_tokenizer_dir(tmp_path_factory, store) -> Path:
    out = tmp_path_factory.mktemp("student_tokenizer")
    train_store_tokenizer(str(store), 400, out)
    return out


@pytest.fixture(scope="module")
def student_tokenizer(student_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_tokenizer_dir, local_files_only=True)


# ---------------------------------------------------------------- row text in the store


def test_row_text_tiles_the_documents_and_each_piece_is_its_token(smollm2_tokenizer):
    rows = pack_file(DOCS_WITH_UNICODE, smollm2_tokenizer, 16, "ab" * 32, with_text=True)
    eos = smollm2_tokenizer.eos_token_id
    assert "".join(rows.text) == "".join(DOCS_WITH_UNICODE)  # EOS and padding pieces are empty
    checked = 0
    for r in range(rows.num_rows):
        ends = rows.char_end[r]
        assert (np.diff(ends) >= 0).all() and ends[-1] == len(rows.text[r])
        starts = np.concatenate([[0], ends[:-1]])
        for t in range(16):
            piece = rows.text[r][starts[t]:ends[t]]
            token = int(rows.input_ids[r, t])
            if not rows.valid[r, t] or token == eos:
                assert piece == ""
                continue
            decoded = smollm2_tokenizer.decode([token])
            if "\ufffd" not in decoded:  # a byte-level token holding part of a character decodes alone to U+FFFD
                assert piece == decoded
                checked += 1
    assert checked > 30


def test_text_fields_round_trip_and_plain_pyarrow_reads_them(store):
    reader = StoreReader(str(store))
    assert {"text", "char_end"} <= set(reader.field_names)
    shard = reader.shard_ids()[0]
    rows = reader.read_shard(shard, ["text", "char_end", "input_ids", "valid"])
    tokenizer = store_tokenizer(reader)
    for text, ids, valid in zip(rows["text"], rows["input_ids"], rows["valid"], strict=True):
        assert tokenizer.decode(ids[valid], skip_special_tokens=True) == text
    from kdstore.summary import summarize
    from pipeline.capture.shard_plan import field_bytes_per_token

    assert summarize(str(store)).field_bytes_per_token()["text"] > 0  # `kdcache inspect` counts text.arrow
    assert field_bytes_per_token(reader.spec)[1]["text"] > 0  # and `kdcache plan` estimates it
    table = pa.ipc.open_file(str(store / "shards" / shard / "text.arrow")).read_all()
    assert table.schema.field("text").type == pa.string()
    assert table.column("text").to_pylist() == list(rows["text"])
    batch = next(iter(KDStream(reader, ["text", "char_end", "input_ids"], 2, seed=0)))
    assert isinstance(batch["text"], list) and all(isinstance(t, str) for t in batch["text"])
    assert batch["char_end"].shape == batch["input_ids"].shape


def test_text_flag_keeps_older_fingerprints():
    plain = StoreSpec(vocab_size=100, row_length=8, shard_rows=2, topk=TopKSpec(k=4))
    assert "text" not in plain.to_dict()
    with_text = StoreSpec(vocab_size=100, row_length=8, shard_rows=2, topk=TopKSpec(k=4), text=True)
    assert StoreSpec.from_dict(with_text.to_dict()) == with_text
    assert fingerprint(plain, Provenance()) != fingerprint(with_text, Provenance())


# ---------------------------------------------------------------- tokenizer, re-tokenisation, alignment


def test_student_tokenizer_is_trained_on_training_documents_only(store, student_tokenizer):
    reader = StoreReader(str(store))
    docs = list(training_documents(reader))
    assert 20 <= len(docs) < 40  # about 30 % held out
    assert 257 < len(student_tokenizer) <= 400 and student_tokenizer.eos_token_id is not None  # merges run out on 24 words
    for doc in docs[:5]:
        ids = student_tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert student_tokenizer.decode(ids) == doc


def _batch(store: Path, fields: list[str], n: int = 4) -> dict:
    reader = StoreReader(str(store))
    return next(iter(KDStream(reader, fields, n, seed=0)))


FIELDS = ["sample_id", "text", "char_end", "input_ids", "valid", "doc_ids", "topk_ids", "topk_logp", "topk_tail",
          "hidden_2"]


def test_same_tokenizer_retokenises_to_the_same_rows_fully_aligned(store):
    reader = StoreReader(str(store))
    batch = _batch(store, FIELDS)
    out = retokenizer(store_tokenizer(reader), reader, None)(batch)
    for r in range(len(batch["text"])):
        valid = batch["valid"][r]
        n = int(valid.sum())
        assert out["valid"][r].sum() == n
        assert torch.equal(out["input_ids"][r, :n], batch["input_ids"][r, :n].long())
        assert torch.equal(out["align_pos"][r, :n], torch.arange(n))
    assert torch.equal(out["teacher_input_ids"], batch["input_ids"])


def test_foreign_tokenizer_alignment_pairs_positions_at_the_same_text(store, student_tokenizer):
    reader = StoreReader(str(store))
    batch = _batch(store, FIELDS)
    out = retokenizer(student_tokenizer, reader, 200)(batch)
    teacher_tok = store_tokenizer(reader)
    paired = 0
    for r, text in enumerate(batch["text"]):
        n = int(out["valid"][r].sum())
        student_ids = out["input_ids"][r, :n].tolist()
        assert student_tokenizer.decode(student_ids, skip_special_tokens=True) == text
        for s in range(n):
            t = int(out["align_pos"][r, s])
            if t < 0:
                continue
            paired += 1
            prefix_s = student_tokenizer.decode(student_ids[:s + 1], skip_special_tokens=True)
            prefix_t = teacher_tok.decode(batch["input_ids"][r, :t + 1].tolist(), skip_special_tokens=True)
            assert prefix_s == prefix_t  # both predict from the same point of the text
            assert (student_ids[s] == student_tokenizer.eos_token_id) == (
                int(batch["input_ids"][r, t]) == teacher_tok.eos_token_id)
    assert paired > 0.3 * int(out["valid"].sum())
    assert out["truncated_tokens"] == 0


def test_long_student_rows_are_cut_and_counted(store, student_tokenizer):
    reader = StoreReader(str(store))
    batch = _batch(store, FIELDS)
    full = retokenizer(student_tokenizer, reader, 1000)(batch)
    cut = Retokenizer(student_tokenizer, store_tokenizer(reader).eos_token_id, 10)(batch)
    assert cut["input_ids"].shape[1] == 10
    assert int(cut["truncated_tokens"]) == int(full["valid"].sum()) - int(cut["valid"].sum())


def test_vocab_maps(store, student_tokenizer):
    teacher_tok = store_tokenizer(StoreReader(str(store)))
    first = vocab_map(teacher_tok, student_tokenizer, "first_token")
    texts = token_texts(teacher_tok)
    assert first.shape == (len(teacher_tok),) and int(first[teacher_tok.eos_token_id]) == student_tokenizer.eos_token_id
    for tid in random.Random(0).sample(range(len(teacher_tok)), 200):
        ids = student_tokenizer(texts[tid], add_special_tokens=False)["input_ids"]
        if ids and tid != teacher_tok.eos_token_id:
            assert int(first[tid]) == ids[0]
    mined = vocab_map(teacher_tok, student_tokenizer, "min_edit")
    student_texts = token_texts(student_tokenizer)
    for tid in random.Random(1).sample(range(len(teacher_tok)), 40):
        if tid == teacher_tok.eos_token_id:
            continue
        best = min(Levenshtein.distance(texts[tid], s) for s in student_texts)
        assert Levenshtein.distance(texts[tid], student_texts[int(mined[tid])]) == best
    the = teacher_tok.convert_tokens_to_ids("Ġthe")
    assert " the" in student_texts and student_texts[int(mined[the])] == " the"  # exact matches first


# ---------------------------------------------------------------- losses against references


def _crafted(seed: int = 0, B: int = 2, L: int = 5, T: int = 6, Vt: int = 12, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(B, T, Vt, generator=g, dtype=torch.float64) * 2, -1)
    logp, ids = full.topk(k, dim=-1)
    tail = 1 - logp.exp().sum(-1)
    align = torch.tensor([[0, -1, 2, 3, 5], [1, 2, -1, 4, -1]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    return {"topk_ids": ids, "topk_logp": logp, "topk_tail": tail, "align_pos": align, "valid": valid}


def test_token_alignment_equals_the_coarsened_dense_reference():
    batch = _crafted()
    Vs = 7
    id_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 6])  # teacher ids 7..11 share student ids
    logits = torch.randn(2, 5, Vs, dtype=torch.float64, requires_grad=True)
    loss = TokenAlignKD(id_map)(StudentOutputs(logits), batch).total
    total, count = 0.0, 0
    q_all = torch.softmax(logits, -1)
    for b in range(2):
        for s in range(5):
            t = int(batch["align_pos"][b, s])
            if t < 0 or not batch["valid"][b, s]:
                continue
            p = torch.zeros(Vs, dtype=torch.float64)
            p.index_add_(0, id_map[batch["topk_ids"][b, t]], batch["topk_logp"][b, t].exp())
            kept = p > 0
            p_tail = batch["topk_tail"][b, t]
            pk = torch.cat([p[kept], p_tail[None]])
            pk = pk / pk.sum()
            q = q_all[b, s]
            qk = torch.cat([q[kept], (1 - q[kept].sum())[None]])
            total = total + (pk * (pk.log() - qk.log())).sum()
            count += 1
    reference = total / count
    assert torch.allclose(loss, reference, rtol=1e-9, atol=1e-12)
    g_loss, = torch.autograd.grad(loss, logits, retain_graph=True)
    g_ref, = torch.autograd.grad(reference, logits)
    assert torch.allclose(g_loss, g_ref, rtol=1e-7, atol=1e-10)


def test_token_alignment_with_identity_map_is_the_same_vocabulary_loss():
    batch = _crafted(1)
    T, Vt = 6, 12
    logits_t = torch.randn(2, T, Vt, dtype=torch.float64)
    same = {**batch, "align_pos": torch.arange(T).expand(2, T), "valid": torch.ones(2, T, dtype=torch.bool)}
    cross = TokenAlignKD(torch.arange(Vt))(StudentOutputs(logits_t), same).total
    direct = DistributionLoss("fkl")(StudentOutputs(logits_t), {**batch, "valid": same["valid"]}).total
    assert torch.allclose(cross, direct, rtol=1e-9)


def test_no_aligned_position_gives_zero_not_nan():
    batch = {**_crafted(), "align_pos": torch.full((2, 5), -1)}
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = TokenAlignKD(torch.arange(12) % 7)(StudentOutputs(logits), batch).total
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_cross_model_attention_stays_inside_documents_and_trains_its_projections():
    torch.manual_seed(0)
    B, L, T, Vs, Vt, ds, dt = 2, 5, 6, 9, 12, 8, 10
    batch = _crafted(2)
    batch.update(
        input_ids=torch.randint(0, Vs, (B, L)), doc_ids=torch.tensor([[0, 0, 1, 1, 1], [4, 4, 4, 4, -1]]),
        teacher_input_ids=torch.randint(0, Vt, (B, T)), teacher_valid=torch.tensor([[True] * 6, [True] * 5 + [False]]),
        teacher_doc_ids=torch.tensor([[0, 0, 0, 1, 1, 1], [4, 4, 4, 4, 4, -1]]), hidden_2=torch.randn(B, T, dt))
    loss = CrossModelAttentionKD(torch.randn(Vt, dt), torch.randn(Vt, dt), ds, 2, PLAIN_CMA)
    head = torch.randn(Vs, ds, requires_grad=True)
    hidden = torch.randn(B, L, ds, requires_grad=True)
    logits = hidden @ head.T
    student = StudentOutputs(logits, (hidden, hidden), None, head)
    scores, allowed = loss.attention_scores(student, batch)
    weights = _softmax(scores, allowed)
    assert torch.equal(weights > 0, allowed)  # never across documents, padding or invalid keys
    assert torch.allclose(weights.sum(-1)[allowed.any(-1)], torch.ones(()))
    result = loss(student, batch)
    assert set(result.components) == {"cma_s2t", "cma_t2s", "cma_t2s_ce"}
    result.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (loss.query.weight, loss.t2s.weight, loss.s2t.weight))
    assert hidden.grad.abs().sum() > 0


def test_cross_model_attention_authors_recipe_values_and_student_ce():
    """The authors' values (h_t / std + next-token teacher embeddings / std) and kd_rate: the total
    is (1 - kd_rate) · student CE + kd_rate · (s2t + t2s + t2s_ce)."""
    torch.manual_seed(1)
    B, L, T, Vs, Vt, ds, dt = 2, 5, 6, 9, 12, 8, 10
    batch = _crafted(2)
    batch.update(
        input_ids=torch.randint(0, Vs, (B, L)), doc_ids=torch.zeros(B, L, dtype=torch.long),
        teacher_input_ids=torch.randint(0, Vt, (B, T)), teacher_valid=torch.ones(B, T, dtype=torch.bool),
        teacher_doc_ids=torch.zeros(B, T, dtype=torch.long), hidden_2=100 * torch.randn(B, T, dt))
    emb = torch.randn(Vt, dt)
    plain = CrossModelAttentionKD(torch.randn(Vt, dt), emb, ds, 2, PLAIN_CMA)
    recipe = CrossModelAttentionKD(plain.teacher_head, emb, ds, 2, PLAIN_CMA.model_copy(update={"kd_rate": 0.5, "target_values": True}))
    recipe.load_state_dict(plain.state_dict())
    head = torch.randn(Vs, ds)
    hidden = torch.randn(B, L, ds)
    student = StudentOutputs(hidden @ head.T, (hidden, hidden), None, head)
    a, b = plain(student, batch), recipe(student, batch)
    assert b.components["cma_t2s_ce"] != a.components["cma_t2s_ce"]  # other values: the next-token embeddings
    c = b.components
    torch.testing.assert_close(b.total, 0.5 * c["cma_ce"] + 0.5 * (c["cma_s2t"] + c["cma_t2s"] + c["cma_t2s_ce"]))
    assert torch.isfinite(b.total)


def test_cross_model_attention_all_padding_is_zero():
    B, L, T, Vs, Vt, ds, dt = 1, 3, 4, 5, 12, 4, 6
    batch = _crafted(3, B=1, L=3, T=4)
    batch.update(input_ids=torch.zeros(B, L, dtype=torch.long), valid=torch.zeros(B, L, dtype=torch.bool),
                 doc_ids=torch.full((B, L), -1), teacher_input_ids=torch.zeros(B, T, dtype=torch.long),
                 teacher_valid=torch.zeros(B, T, dtype=torch.bool), teacher_doc_ids=torch.full((B, T), -1),
                 hidden_2=torch.randn(B, T, dt))
    loss = CrossModelAttentionKD(torch.randn(Vt, dt), torch.randn(Vt, dt), ds, 2, PLAIN_CMA)
    hidden = torch.randn(B, L, ds, requires_grad=True)
    head = torch.randn(Vs, ds)
    result = loss(StudentOutputs(hidden @ head.T, (hidden,), None, head), batch)
    result.total.backward()
    assert result.total.item() == 0.0 and torch.isfinite(hidden.grad).all()


# ---------------------------------------------------------------- training and evaluation


def _train_cfg(store: Path, out: Path, teacher: Path, tokenizer: Path | None, losses: list, **over) -> dict:
    student = {"init": "teacher_layers", "teacher": str(teacher), "num_layers": 1}
    if tokenizer is not None:
        student["tokenizer"] = str(tokenizer)
    return {"store": str(store), "out": str(out), "student": student, "losses": losses, "batch_size": 2,
            "steps": 3, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 100, "device": "cpu",
            "tensorboard": False, **over}


@pytest.mark.parametrize("losses", [[{"name": "xtok_align"}, {"name": "ce", "weight": 0.5}],
                                    [{"name": "dskd_cma"}, {"name": "ce"}], [{"name": "ce"}]],
                         ids=["xtok_align", "dskd_cma", "ce_only"])
def test_foreign_student_trains_and_is_evaluated_on_its_own_tokens(store, tiny_teacher_dir, student_tokenizer_dir,
                                                                  student_tokenizer, losses, tmp_path):
    out = tmp_path / "run"
    train(_train_cfg(store, out, tiny_teacher_dir, student_tokenizer_dir, losses), progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(e["loss"]) for e in log)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(student_tokenizer)
    same = tmp_path / "same"
    train(_train_cfg(store, same, tiny_teacher_dir, None, [{"name": "fkl"}], steps=1), progress=False)
    said: list[str] = []
    models = {"foreign": str(out / "model"), "foreign_again": str(out / "model"), "same": str(same / "model")}
    result = evaluate(parse_config({"store": str(store), "out": str(tmp_path / "eval"), "teacher": str(tiny_teacher_dir),
                                    "models": models, "max_tokens": 128, "device": "cpu",
                                    "generation": {"prompts": 2, "prompt_tokens": 4, "new_tokens": 4}}, EvalConfig),
                      progress=said.append)
    foreign, same_m = result["models"]["foreign"], result["models"]["same"]
    assert result["own_tokenizer"] == ["foreign", "foreign_again"]
    # one packing per tokenizer: the store's (teacher + same), then the students' own (both foreign models)
    assert [line.split(" on ")[0] for line in said if line.startswith("evaluating")] == [
        "evaluating teacher, same", "evaluating foreign, foreign_again"]
    assert result["models"]["foreign_again"]["ppl"] == foreign["ppl"]
    assert "kl_to_teacher" not in foreign and "generation" not in foreign
    assert "kl_to_teacher" in same_m and "generation" in same_m
    assert math.isfinite(foreign["ppl"]) and 0 < foreign["bits_per_byte"] < 20
    for m in (foreign, same_m):
        assert math.isclose(m["bits_per_byte"] * m["bytes"] * math.log(2), m["nll"] * m["tokens"], rel_tol=1e-9)
    rows = heldout_rows(StoreReader(str(store)), student_tokenizer, 128)  # its own packing of the same documents
    mask = predicted_mask(torch.from_numpy(rows.doc_ids), torch.from_numpy(rows.valid))
    labels = torch.from_numpy(rows.input_ids)[:, 1:][mask].tolist()
    assert foreign["tokens"] == len(labels)
    assert foreign["bytes"] == sum(len(student_tokenizer.decode([y], skip_special_tokens=True).encode()) for y in labels)


def test_embedding_init_follows_the_teacher_embeddings(store, tiny_teacher_dir, student_tokenizer_dir, student_tokenizer,
                                                     tmp_path):
    trainer = Trainer(parse_config(_train_cfg(store, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir,
                                              [{"name": "xtok_align"}]), TrainConfig))
    teacher_tok = store_tokenizer(StoreReader(str(store)))
    from transformers import AutoModelForCausalLM

    teacher_emb = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).get_input_embeddings().weight
    emb = trainer.student.model.get_input_embeddings().weight
    word = student_tokenizer.convert_tokens_to_ids("Ġstudents")
    ids = teacher_tok(" students", add_special_tokens=False)["input_ids"]
    assert isinstance(word, int) and len(ids) >= 1
    assert torch.allclose(emb[word], teacher_emb[ids].mean(0))
    assert trainer.student.foreign and trainer.student.model.config.eos_token_id == student_tokenizer.eos_token_id


# ---------------------------------------------------------------- bad input


def test_cross_tokenizer_loss_on_a_store_without_text_names_the_field(tmp_path_factory, tiny_teacher_dir, corpus,
                                                                      student_tokenizer_dir, tmp_path):
    plain = _cache(tmp_path_factory.mktemp("plain") / "store", tiny_teacher_dir, corpus)
    with pytest.raises(MissingLossFieldError, match="'xtok_align' needs store field.*'text'"):
        Trainer(parse_config(_train_cfg(plain, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir,
                                        [{"name": "xtok_align"}]), TrainConfig))
    with pytest.raises(CrossTokenizerError, match=r"store .* has no field\(s\) \['text', 'char_end'\]"):
        Trainer(parse_config(_train_cfg(plain, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir,
                                        [{"name": "ce"}]), TrainConfig))


def test_mixes_that_cannot_work_are_refused(store, tiny_teacher_dir, student_tokenizer_dir, tmp_path):
    with pytest.raises(LossConfigError, match=r"\['fkl'\] read the teacher's signals at the teacher's token positions"):
        check_cross_tokenizer([{"name": "fkl"}, {"name": "xtok_align"}], True)
    with pytest.raises(LossConfigError, match=r"\['fkl'\] read .* for a student with its own tokenizer"):
        Trainer(parse_config(_train_cfg(store, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir,
                                        [{"name": "fkl"}]), TrainConfig))
    assert check_cross_tokenizer([{"name": "ce"}], True)  # the CE-only baseline of such a student
    assert not check_cross_tokenizer([{"name": "fkl"}, {"name": "ce"}], False)
    assert not check_cross_tokenizer([{"name": "multi_teacher", "weights": [0.5, 0.5]}], False)  # no store needed
    with pytest.raises(ValueError, match="no extra_stores, no online_teacher"):
        parse_config(_train_cfg(store, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir, [{"name": "xtok_align"}],
                                online_teacher=str(tiny_teacher_dir)), TrainConfig)
    assert check_cross_tokenizer([{"name": "mix", "losses": [{"name": "dskd_cma"}, {"name": "ce"}]}], True)


def test_student_tokenizer_setups_that_cannot_work(store, tiny_teacher_dir, student_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(student_tokenizer_dir, local_files_only=True)
    no_eos.eos_token = None
    with pytest.raises(CrossTokenizerError, match="has no eos token"):
        Retokenizer(no_eos, 0, 16)
    with pytest.raises(ConfigError, match="student.tokenizer applies to init config / teacher_layers"):
        parse_config(_train_cfg(store, tmp_path / "r", tiny_teacher_dir, student_tokenizer_dir, [{"name": "ce"}],
                                student={"init": "pretrained", "path": str(tiny_teacher_dir),
                                         "tokenizer": str(student_tokenizer_dir)}), TrainConfig)
    with pytest.raises(ConfigError, match="not empty: a trained tokenizer is never overwritten"):
        train_store_tokenizer(str(store), 300, student_tokenizer_dir)
    with pytest.raises(ConfigError, match="vocab_size 100 is below"):
        train_store_tokenizer(str(store), 100, tmp_path / "small")
    assert (student_tokenizer_dir / "tokenizer.json").is_file()  # untouched


def test_missing_student_tokenizer_folder_is_named(store, tiny_teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="student.tokenizer .*nowhere.* is not a tokenizer folder"):
        Trainer(parse_config(_train_cfg(store, tmp_path / "r", tiny_teacher_dir, tmp_path / "nowhere",
                                        [{"name": "xtok_align"}]), TrainConfig))


def test_build_loss_without_student_tokenizer_is_refused(store):
    from pipeline.train.losses import StudentDims

    with pytest.raises(LossConfigError, match="needs the student's tokenizer"):
        build_loss([{"name": "xtok_align"}], StoreReader(str(store)), StudentDims(1, 64))


def test_tokenizer_command(store, tmp_path, capsys):
    from flows.cli import main

    assert main(["tokenizer", str(store), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and "byte-level BPE of 300 ids" in capsys.readouterr().out
    assert main(["tokenizer", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t2")]) == 2
    assert "no kdcache store" in capsys.readouterr().err
