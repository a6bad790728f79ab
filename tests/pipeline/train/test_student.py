"""Students: random from the store's teacher config, pretrained folders, a subset of the teacher's
layers; the store's tokenizer is enforced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdstore.reader import StoreReader
from pipeline.capture.teacher import tokenizer_digest
from pipeline.capture.teacher_pass import run_cache
from pipeline.config import CacheConfig, parse_config
from pipeline.train.student import (
    StudentConfig,
    TokenizerMismatchError,
    build_student,
    evenly_spaced,
)

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def reader(tmp_path_factory, tiny_teacher_dir) -> StoreReader:
    root = tmp_path_factory.mktemp("student_store")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("The cat sat on the mat and looked at the quiet garden. " * 4)
    cfg = parse_config({
        "store": str(root / "store"), "teacher": {"name": str(tiny_teacher_dir)},
        "corpus": {"kind": "files", "paths": [str(root / "corpus")]}, "row_length": 32, "shard_rows": 4,
        "split": "all", "signals": {"topk": {"k": 4}},
    }, CacheConfig)
    run_cache(cfg, progress=None)
    return StoreReader(cfg.store)


IDS = torch.tensor([[1, 504, 2368, 3470, 335, 260, 1023, 30]])


def test_evenly_spaced():
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    for total in range(1, 60):
        for keep in range(2, total + 1):
            got = evenly_spaced(total, keep)
            assert len(got) == keep and len(set(got)) == keep and got == sorted(got)
            assert got[0] == 0 and got[-1] == total - 1
    assert evenly_spaced(7, 1) == [6]
    for total, keep in ((3, 4), (3, 0)):
        with pytest.raises(ValueError, match=f"cannot keep {keep} of {total} layers"):
            evenly_spaced(total, keep)


def test_random_student_from_the_store_config(reader):
    student = build_student(StudentConfig(init="config", overrides=SMALL), reader, needs_attentions=True)
    model = student.model
    for key, value in SMALL.items():
        assert getattr(model.config, key) == value
    assert len(model.model.layers) == 1 and model.config.vocab_size == reader.spec.vocab_size
    assert student.origin.startswith("random llama")
    assert tokenizer_digest(student.tokenizer) == reader.meta.provenance.teacher["tokenizer_sha256"]
    assert all(p.requires_grad for p in model.parameters())
    out = model(IDS, output_attentions=True, output_hidden_states=True)
    assert out.logits.shape == (1, 8, reader.spec.vocab_size) and torch.isfinite(out.logits).all()
    assert out.attentions[0].shape == (1, 2, 8, 8) and out.hidden_states[-1].shape == (1, 8, 32)
    with pytest.raises(ValueError, match="student.overrides: the model config has no key 'hiden_size'"):
        build_student(StudentConfig(init="config", overrides={"hiden_size": 32}), reader)


def test_pretrained_student(reader, tmp_path, make_tiny_teacher, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_teacher(tmp_path / "pre", smollm2_tokenizer, seed=7, num_hidden_layers=1)
    student = build_student(StudentConfig(init="pretrained", path=str(folder)), reader)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    ref = reference.state_dict()
    for key, value in student.model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert student.origin == str(folder)
    with pytest.raises(FileNotFoundError, match="student.path .*nowhere.* does not exist"):
        build_student(StudentConfig(init="pretrained", path=str(tmp_path / "nowhere")), reader)


def test_student_from_teacher_layers(reader, tmp_path, make_tiny_teacher, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    teacher_dir = make_tiny_teacher(tmp_path / "deep", smollm2_tokenizer, num_hidden_layers=30)
    keep = evenly_spaced(30, 6)
    student = build_student(StudentConfig(init="teacher_layers", teacher=str(teacher_dir), num_layers=6), reader)
    model = student.model
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert model.config.num_hidden_layers == 6 and model.config.kdcache_teacher_layers == keep
    assert len(model.model.layers) == 6
    for j, i in enumerate(keep):
        mine, theirs = model.model.layers[j].state_dict(), teacher.model.layers[i].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert model.model.layers[j].self_attn.layer_idx == j
    other = teacher.model.layers[1].state_dict()  # not kept: differs from the student's second layer
    assert not torch.equal(model.model.layers[1].state_dict()["self_attn.q_proj.weight"], other["self_attn.q_proj.weight"])
    assert torch.equal(model.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    out = model(IDS)
    assert out.logits.shape == (1, 8, reader.spec.vocab_size) and torch.isfinite(out.logits).all()
    # layer_idx renumbered: cached generation equals a fresh forward on the generated prefix
    model.eval()
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        again = model(generated[:, :-1], use_cache=False).logits[:, IDS.shape[1] - 1:].argmax(-1)
    assert torch.equal(again, generated[:, IDS.shape[1]:])
    # explicit layers, in the given order
    picked = build_student(StudentConfig(init="teacher_layers", teacher=str(teacher_dir), layers=[3, 7]), reader)
    assert picked.model.config.kdcache_teacher_layers == [3, 7] and len(picked.model.model.layers) == 2
    assert "layers [3, 7]" in picked.origin


def test_bad_layer_indices(reader, tiny_teacher_dir):
    for layers, message in (([0, 2], r"student.layers \[2\]: the teacher has layers 0..1"),
                            ([-1], r"student.layers \[-1\]: the teacher has layers 0..1"),
                            ([1, 1], r"student.layers \[1, 1\]: layer\(s\) \[1\] repeated"),
                            ([], r"student.layers \[\]: empty")):
        with pytest.raises(ValueError, match=message):
            build_student(StudentConfig(init="teacher_layers", teacher=str(tiny_teacher_dir), layers=layers), reader)
    with pytest.raises(ValueError, match="cannot keep 3 of 2 layers"):
        build_student(StudentConfig(init="teacher_layers", teacher=str(tiny_teacher_dir), num_layers=3), reader)


def test_tokenizer_mismatch_is_refused(reader, tmp_path, make_tiny_teacher, smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)  # own copy
    tokenizer.add_tokens(["<kdcache_extra>"])
    folder = make_tiny_teacher(tmp_path / "other_tok", tokenizer, num_hidden_layers=1)
    theirs = tokenizer_digest(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    expected = reader.meta.provenance.teacher["tokenizer_sha256"]
    assert theirs != expected
    with pytest.raises(TokenizerMismatchError, match=rf"tokenizer digest {theirs}, store .* was made with {expected}"):
        build_student(StudentConfig(init="pretrained", path=str(folder)), reader)
    with pytest.raises(TokenizerMismatchError, match=expected):  # a teacher to cut layers from is checked too
        build_student(StudentConfig(init="teacher_layers", teacher=str(folder), num_layers=1), reader)
