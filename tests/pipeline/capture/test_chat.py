"""Chat corpora: reading both shapes, rendering with two chat templates, loss masks, packing whole
conversations, and bad input named by file and record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.capture.chat import ChatRecordError, iter_records, render_conversation
from pipeline.capture.corpus import CorpusError, CorpusSource, list_corpus_files
from pipeline.capture.packing import iter_packed_chat

KEY = "ab" * 20
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, of course."}]
# Llama-2 style: no generation prompt of its own, the system turn folded into the first user turn
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
          "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}"
          " {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
# ChatML with {% generation %} markers, so transformers' own assistant mask can check ours
CHATML_GEN = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
              "{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama2_tokenizer(smollm2_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)
    tok.chat_template = LLAMA2
    return tok


def _masked_text(tok, r) -> list[str]:
    """The decoded runs of masked tokens."""
    runs, cur = [], []
    for i, m in zip(r.ids, r.mask, strict=True):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_chatml_mask_is_the_assistant_turns(smollm2_tokenizer):
    r = render_conversation(CONV, smollm2_tokenizer, None, "assistant", "x")
    assert _masked_text(smollm2_tokenizer, r) == ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]
    full = smollm2_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert smollm2_tokenizer.decode(r.ids) == full
    assert r.turn_ends[-1] == len(r.ids) and r.assistant == (False, False, True, False, True)


def test_mask_matches_transformers_generation_mask(smollm2_tokenizer):
    ours = render_conversation(CONV, smollm2_tokenizer, CHATML_GEN, "assistant", "x")
    theirs = smollm2_tokenizer.apply_chat_template(CONV, chat_template=CHATML_GEN, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
    assert ours.ids.tolist() == list(theirs["input_ids"])
    assert ours.mask.astype(int).tolist() == list(theirs["assistant_masks"])


def test_second_template_llama2_style(llama2_tokenizer):
    tok = llama2_tokenizer
    r = render_conversation(CONV, tok, None, "assistant", "x")
    assert tok.decode(r.ids).startswith(tok.bos_token + "<<SYS>>Be brief.<</SYS>>[INST]")
    assert [t.strip() for t in _masked_text(tok, r)] == [f"Four. {tok.eos_token}", f"Six, of course. {tok.eos_token}"]
    # the same mask, as a template passed in the config, on the ChatML tokenizer
    assert np.array_equal(render_conversation(CONV, tok, LLAMA2, "assistant", "x").mask, r.mask)


def test_mask_modes_all_and_last(smollm2_tokenizer):
    records = [("r0", {"messages": CONV})]
    (last,) = iter_packed_chat(records, smollm2_tokenizer, 128, KEY, mask="last")
    (every,) = iter_packed_chat(records, smollm2_tokenizer, 128, KEY, mask="all")
    r = render_conversation(CONV, smollm2_tokenizer, None, "assistant", "x")
    n = len(r.ids)
    assert every.loss_mask[0].sum() == n and every.loss_mask[0, n:].sum() == 0
    got = smollm2_tokenizer.decode(last.input_ids[0][last.loss_mask[0]])
    assert got == "Six, of course.<|im_end|>\n"


def test_packing_keeps_conversations_whole_and_counts_long_ones(smollm2_tokenizer):
    tok = smollm2_tokenizer
    n = len(render_conversation(CONV, tok, None, "assistant", "x").ids)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    records = [(f"r{i}", {"messages": CONV if i % 2 else short}) for i in range(7)]
    T = n + 4
    (rows,) = iter_packed_chat(records, tok, T, KEY)
    for r in range(rows.num_rows):  # every conversation lies inside one row, whole
        for doc in set(rows.doc_ids[r].tolist()) - {-1}:
            assert doc not in set(np.delete(rows.doc_ids, r, axis=0).ravel().tolist())
    assert rows.docs == 7 and rows.long_docs == rows.skipped_docs == 0
    assert not rows.loss_mask[~rows.valid].any()
    # longer than a row: cut after the first assistant turn, or skipped
    cut = render_conversation(CONV, tok, None, "assistant", "x").turn_ends[2]
    (trunc,) = iter_packed_chat([("r0", {"messages": CONV})], tok, n - 1, KEY)
    assert trunc.long_docs == 1 and trunc.valid.sum() == cut
    assert tok.decode(trunc.input_ids[0][trunc.loss_mask[0]]) == "Four.<|im_end|>\n"
    chunks = list(iter_packed_chat([("r0", {"messages": CONV}), ("r1", {"messages": short})], tok, n - 1, KEY,
                                   too_long="skip"))
    assert sum(c.skipped_docs for c in chunks) == 1 and sum(c.docs for c in chunks) == 1
    with pytest.raises(CorpusError, match="no usable conversations"):
        list(iter_packed_chat([("r0", {"messages": CONV})], tok, 8, KEY))


def _files(tmp_path: Path) -> Path:
    """The same two conversations as JSONL (messages), JSON (ShareGPT) and Parquet (messages)."""
    convs = [CONV, CONV[1:3]]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    inverse = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"id": str(i), "conversations": [{"from": inverse[m["role"]], "value": m["content"]} for m in c]}
             for i, c in enumerate(convs)]
    (tmp_path / "b.json").write_text(json.dumps(share, indent=1))
    pq.write_table(pa.table({"messages": [c for c in convs]}), tmp_path / "c.parquet")
    return tmp_path


def test_three_formats_two_shapes_give_the_same_rows(tmp_path, smollm2_tokenizer):
    source = CorpusSource(kind="chat", paths=(str(_files(tmp_path)),))
    files = list_corpus_files(source)
    assert [f.format for f in files] == ["jsonl", "json", "parquet"]
    packed = [next(iter_packed_chat(iter_records(f, source), smollm2_tokenizer, 256, f.sha256)) for f in files]
    for p in packed[1:]:
        assert np.array_equal(p.input_ids, packed[0].input_ids) and np.array_equal(p.loss_mask, packed[0].loss_mask)


def test_truncated_json_array_names_the_record(tmp_path, smollm2_tokenizer):
    text = json.dumps([{"messages": CONV}, {"messages": CONV}])
    (tmp_path / "t.json").write_text(text[: len(text) - 30])
    (file,) = list_corpus_files(CorpusSource(kind="chat", paths=(str(tmp_path),)))
    with pytest.raises(CorpusError, match=r"t\.json record 1: invalid JSON"):
        list(iter_records(file, CorpusSource(kind="chat", paths=(str(tmp_path),))))


# ----------------------------------------------------------------------------- bad input


def _pack(tmp_path, tok, lines, **kw):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    source = CorpusSource(kind="chat", paths=(str(path),))
    (file,) = list_corpus_files(source)
    return list(iter_packed_chat(iter_records(file, source), tok, 256, file.sha256, name=file.path, **kw))


GOOD = {"messages": CONV[1:3]}
BAD = {
    "unknown role": ({"messages": [{"role": "narrator", "content": "Once"}, *CONV[1:3]]}, "unknown role 'narrator'"),
    "no assistant": ({"messages": [CONV[1]]}, "no assistant turn"),
    "empty content": ({"messages": [CONV[1], {"role": "assistant", "content": "  "}]}, "empty content"),
    "mixed shapes": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
                     "mixed shapes"),
}


@pytest.mark.parametrize("case", ["unknown role", "no assistant", "empty content", "mixed shapes"])
def test_bad_record_is_named_or_skipped_and_counted(tmp_path, smollm2_tokenizer, case):
    record, message = BAD[case]
    with pytest.raises(ChatRecordError, match=rf"bad\.jsonl line 2.*{message}") as info:
        _pack(tmp_path, smollm2_tokenizer, [GOOD, record, GOOD])
    assert "\n" not in str(info.value)
    chunks = _pack(tmp_path, smollm2_tokenizer, [GOOD, record, GOOD], on_bad="skip")
    assert sum(c.skipped_docs for c in chunks) == 1 and sum(c.docs for c in chunks) == 2


def test_sharegpt_unknown_role_is_named(tmp_path, smollm2_tokenizer):
    record = {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "Yo"}]}
    with pytest.raises(ChatRecordError, match=r"line 1 turn 0: unknown role 'narrator'"):
        _pack(tmp_path, smollm2_tokenizer, [record])


def test_tokenizer_without_template_is_refused_unless_given(tmp_path, smollm2_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)
    tok.chat_template = None
    with pytest.raises(CorpusError, match="has no chat template: set corpus.chat.template"):
        _pack(tmp_path, tok, [GOOD])
    (rows,) = _pack(tmp_path, tok, [GOOD], template=LLAMA2)
    assert rows.loss_mask.sum() > 0
