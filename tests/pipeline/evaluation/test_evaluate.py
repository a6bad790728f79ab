"""`kdcache eval` on tiny random models: metrics against dense references, crafted cases (a
student identical to the teacher), the report folder, bytes/token by k, and bad input.

One module-scoped store: the tiny teacher over 40 short documents, split train (val_fraction 0.3,
so about 12 documents are held out), rows of 32 tokens, top-8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from short_docs import cache_short_docs, write_short_docs

from flows.cli import main
from kdstore.reader import StoreReader
from kdstore.summary import summarize, topk_bytes_by_k
from pipeline.capture.teacher_files import store_tokenizer
from pipeline.config import ConfigError, parse_config
from pipeline.evaluation.evaluate import (
    TEACHER,
    EvalConfig,
    EvalError,
    evaluate,
    heldout_rows,
    predicted_mask,
    prompt_windows,
)
from pipeline.evaluation.report import metrics_table, write_report

_cache = cache_short_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_short_docs(tmp_path_factory.mktemp("eval_corpus"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, corpus) -> Path:
    return _cache(tmp_path_factory.mktemp("eval_store") / "store", tiny_teacher_dir, corpus)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, smollm2_tokenizer, make_tiny_teacher) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("other_student"), smollm2_tokenizer, seed=7)


def _cfg(store: Path, out: Path, teacher: Path, models: dict, **over) -> EvalConfig:
    data = {"store": str(store), "out": str(out), "teacher": str(teacher), "models": models,
            "max_tokens": 256, "batch_size": 3, "device": "cpu",
            "generation": {"prompts": 3, "prompt_tokens": 8, "new_tokens": 8}}
    data.update(over)
    return parse_config(data, EvalConfig)


def test_predicted_mask_stays_inside_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    assert predicted_mask(doc, valid).tolist() == [[True, True, False, True, False]]


def test_heldout_rows_are_the_validation_documents(store):
    reader = StoreReader(store)
    rows = heldout_rows(reader, store_tokenizer(reader), 10_000)
    train_ids = {int(s) for _, arrays in reader.iter_shards(["sample_id"]) for s in arrays["sample_id"]}
    cached = np.concatenate([a["input_ids"] for _, a in reader.iter_shards(["input_ids"])])
    assert rows.tokens > 64 and rows.input_ids.shape[1] == 32
    # no held-out row appears among the cached (training) rows
    cached_rows = {tuple(r) for r in cached}
    assert not any(tuple(r) in cached_rows for r in rows.input_ids)
    assert train_ids  # the store is not empty
    assert heldout_rows(reader, store_tokenizer(reader), 40).input_ids.shape[0] == 2  # ceil(40 / 32)


def test_validation_and_test_rows_divide_the_held_out_documents(store, tiny_teacher_dir, tmp_path):
    reader = StoreReader(store)
    tok = store_tokenizer(reader)
    docs = {s: set(heldout_rows(reader, tok, 10_000, s).doc_ids.ravel().tolist()) - {-1}
            for s in ("validation", "test", "held_out")}
    assert docs["validation"] and docs["test"] and not docs["validation"] & docs["test"]
    assert docs["validation"] | docs["test"] == docs["held_out"]  # one blank-line block per document here
    with pytest.raises(EvalError, match="evaluation split 'train'"):
        heldout_rows(reader, tok, 10_000, "train")
    result = evaluate(_cfg(store, tmp_path, tiny_teacher_dir, {"same": str(tiny_teacher_dir)}, split="test",
                           generation=None), progress=None)
    assert result["split"] == "test"
    assert result["heldout_rows"] == len(heldout_rows(reader, tok, 256, "test").input_ids)


def test_student_identical_to_teacher_has_kl_zero_and_agreement_one(store, tiny_teacher_dir, tmp_path):
    result = evaluate(_cfg(store, tmp_path, tiny_teacher_dir, {"same": str(tiny_teacher_dir)}), progress=None)
    same, teacher = result["models"]["same"], result["models"][TEACHER]
    assert abs(same["kl_to_teacher"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["ppl"] == pytest.approx(teacher["ppl"], rel=1e-6)
    assert same["ece"] == pytest.approx(teacher["ece"], abs=1e-9)
    gen = same["generation"]["vs_teacher"]
    assert gen["bleu"] == pytest.approx(100.0) and gen["cer"] == 0.0 and gen["chrf"] == pytest.approx(100.0)


def test_sampled_continuations_are_seeded_paired_and_distinct_from_greedy(store, tiny_teacher_dir, other_student,
                                                                           tmp_path):
    models = {"same": str(tiny_teacher_dir), "other": str(other_student)}
    seeded = {"prompts": 3, "prompt_tokens": 8, "new_tokens": 8, "seeds": [1, 2]}
    first = evaluate(_cfg(store, tmp_path, tiny_teacher_dir, models, generation=seeded), progress=None)
    again = evaluate(_cfg(store, tmp_path, tiny_teacher_dir, models, generation=seeded), progress=None)
    greedy = evaluate(_cfg(store, tmp_path, tiny_teacher_dir, models), progress=None)
    assert first["samples"] == again["samples"]
    assert first["models"]["other"]["generation"] == again["models"]["other"]["generation"]
    assert [s["same"] for s in first["samples"]] == [s[TEACHER] for s in first["samples"]]  # one seed, both models
    assert first["samples"] != greedy["samples"]
    assert first["decoding"].startswith("sampled") and greedy["decoding"] == "greedy"
    with pytest.raises(ConfigError, match="generation.seeds.*repeated seed"):
        _cfg(store, tmp_path, tiny_teacher_dir, models, generation={**seeded, "seeds": [3, 3]})


def test_metrics_match_a_dense_reference(store, tiny_teacher_dir, other_student, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(store, tmp_path, tiny_teacher_dir, {"other": str(other_student)}, generation=None)
    result = evaluate(cfg, progress=None)
    reader = StoreReader(store)
    rows = heldout_rows(reader, store_tokenizer(reader), cfg.max_tokens)
    ids = torch.from_numpy(rows.input_ids)
    mask = predicted_mask(torch.from_numpy(rows.doc_ids), torch.from_numpy(rows.valid))
    ref = {}
    for name, path in ((TEACHER, tiny_teacher_dir), ("other", other_student)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        with torch.no_grad():
            ref[name] = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)[mask]
    labels = ids[:, 1:][mask]
    for name, lp in ref.items():
        nll = -lp.gather(-1, labels[:, None]).mean().item()
        assert result["models"][name]["ppl"] == pytest.approx(np.exp(nll), rel=1e-4)
        assert result["models"][name]["tokens"] == int(mask.sum())
    kl = (ref[TEACHER].exp() * (ref[TEACHER] - ref["other"])).sum(-1).mean().item()
    agree = (ref[TEACHER].argmax(-1) == ref["other"].argmax(-1)).double().mean().item()
    other = result["models"]["other"]
    assert other["kl_to_teacher"] == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert other["top1_agreement"] == pytest.approx(agree)
    assert 0 <= other["ece"] <= 1 and "generation" not in other


def test_report_folder_and_cli(store, tiny_teacher_dir, other_student, tmp_path, capsys):
    out = tmp_path / "report"
    cfg = _cfg(store, out, tiny_teacher_dir, {"a": str(other_student), "b": str(tiny_teacher_dir)}, baseline="a")
    result = evaluate(cfg, progress=None)
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / s, "fkl": 2.0 / s, "lr": 1e-3}) for s in range(1, 6)))
    by_k = topk_bytes_by_k(str(store), [2, 4, 8])
    written = write_report(result, out, train_logs={"a": str(log)}, bytes_by_k=by_k)
    for key in ("json", "markdown", "metrics", "reliability", "curves", "bytes_vs_k"):
        assert written[key].is_file() and written[key].stat().st_size > 0, key
    md = (out / "README.md").read_text()
    table = metrics_table(result)
    assert table in md and "| teacher |" in table and "| b |" in table and "Δ ppl vs a" in table
    assert json.loads((out / "eval.json").read_text())["models"]["b"]["top1_agreement"] == 1.0
    assert main(["eval", "--no-flow", _write_yaml(tmp_path, cfg)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "report:" in printed


def _write_yaml(folder: Path, cfg: EvalConfig) -> str:
    import yaml

    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return str(path)


def test_bytes_by_k_grow_with_k_and_match_the_store(store):
    by_k = topk_bytes_by_k(str(store), [1, 2, 4, 8], max_shards=100)
    sizes = [p["bytes_per_token"] for p in by_k]
    mass = [p["kept_mass"] for p in by_k]
    assert sizes == sorted(sizes) and mass == sorted(mass) and 0 < mass[0] < mass[-1] <= 1
    assert summarize(str(store)).mean_kept_mass == pytest.approx(mass[-1], abs=1e-3)
    # one shard re-encoded at the store's own k gives the bytes of that shard's own files
    reader = StoreReader(store)
    first = reader.record(reader.shard_ids()[0])
    own = sum(f.bytes for rel, f in first.files.items() if rel.startswith("topk_")) / first.tokens
    assert topk_bytes_by_k(str(store), [8], max_shards=1)[0]["bytes_per_token"] == pytest.approx(own, rel=0.01)
    with pytest.raises(ValueError, match="only k in 1..8"):
        topk_bytes_by_k(str(store), [16])


def test_bad_input_is_named(store, tiny_teacher_dir, other_student, tmp_path, corpus, smollm2_tokenizer, make_tiny_teacher):
    with pytest.raises(EvalError, match="baseline 'zz' is not one of models"):
        evaluate(_cfg(store, tmp_path, tiny_teacher_dir, {"a": str(other_student)}, baseline="zz"), progress=None)
    with pytest.raises(EvalError, match="folder .*nowhere.* does not exist"):
        evaluate(_cfg(store, tmp_path, tiny_teacher_dir, {"a": str(tmp_path / "nowhere")}), progress=None)
    with pytest.raises(EvalError, match="weights digest"):
        evaluate(_cfg(store, tmp_path, other_student, {"a": str(tiny_teacher_dir)}), progress=None)
    all_store = _cache(tmp_path / "all", tiny_teacher_dir, corpus, split="all")
    with pytest.raises(EvalError, match="split 'all'.*none is held out"):
        evaluate(_cfg(all_store, tmp_path, tiny_teacher_dir, {"a": str(other_student)}), progress=None)
    with pytest.raises(Exception, match="unknown key 'modelz'"):
        parse_config({"store": "s", "out": "o", "modelz": {}}, EvalConfig)
    bad_tok = tmp_path / "bad_tok"
    shutil.copytree(other_student, bad_tok)
    tok = json.loads((bad_tok / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][0], "id": 49152, "content": "<extra>"})
    (bad_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EvalError, match="model 'a' .*its tokenizer has 49,153 ids, its vocabulary 49,152"):
        evaluate(_cfg(store, tmp_path, tiny_teacher_dir, {"a": str(bad_tok)}), progress=None)


def test_prompt_windows_stay_in_one_document():
    from pipeline.evaluation.evaluate import HeldOut

    doc = np.array([[0] * 10 + [1] * 22, [2] * 32])
    rows = HeldOut(np.arange(64).reshape(2, 32), doc, np.ones((2, 32), bool))
    windows = prompt_windows(rows, 4, 4, 10)
    assert windows and all(len(set(doc[r, t:t + 8])) == 1 for r, t in windows)
    assert (0, 0) in windows and (0, 10) in windows and (1, 0) in windows
    assert len({(r, int(doc[r, t])) for r, t in windows}) == len(windows)  # one per document
