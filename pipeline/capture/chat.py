"""Conversations → rendered token ids and a per-token loss mask, with the teacher's chat template.

A chat teacher sees conversations as its chat template renders them, so the teacher pass must
run over exactly that rendering, and a student must be trained on the tokens the teacher would
have produced (the assistant's), not on the user's. Both come from the template itself:

- Records: ``messages: [{role, content}]`` or ShareGPT's ``conversations: [{from, value}]``
  (``human``/``user`` → user, ``gpt``/``chatgpt``/``bing``/``bard``/``assistant`` → assistant,
  ``system``, ``tool``), one per JSONL line, JSON array element (streamed: a truncated file still
  yields the records before the cut), Parquet row or hub dataset row. A file holds one shape.
- Rendering: ``apply_chat_template`` of the whole conversation, tokenised once with offsets.
  The **turn boundaries** are where the template's rendering of the first ``i`` turns ends (that
  rendering must be a prefix of the whole: checked, an error otherwise), and an assistant turn's
  trained span starts where the rendering of the turns before it *with the generation prompt*
  ends. So the mask covers the assistant's content and whatever the template closes its turn
  with (``<|im_end|>``, ``</s>``), never its header, and no string search in the rendered text
  is involved: any template that renders turn by turn works.
- Mask modes: ``assistant`` (every assistant turn), ``last`` (the last assistant turn kept),
  ``all`` (every token of the conversation).

Bad records (unknown role, empty content, no assistant turn, a record of the other shape, a
template error) raise `ChatRecordError` naming the file and record; with ``on_bad="skip"`` the
packer counts and skips them instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.capture.corpus import CHAT_SUFFIXES, CorpusError, CorpusFile, CorpusSource

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "assistant": "assistant", "system": "system", "tool": "tool"}
SHAPES = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


class ChatRecordError(CorpusError):
    """One bad conversation record (skippable with ``on_bad="skip"``); names file and record."""


@dataclass(frozen=True)
class Rendered:
    """One rendered conversation: ids [n], the loss mask [n] and each turn's token end."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # bool
    turn_ends: tuple[int, ...]  # token index where turn i ends (exclusive)
    assistant: tuple[bool, ...]  # whether turn i is an assistant turn


# ----------------------------------------------------------------------------- files


def iter_records(file: CorpusFile, source: CorpusSource) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of a chat file, in file order."""
    if file.format == "hub":
        import datasets

        name, commit = file.path.removeprefix("hub:").rsplit("@", 1)
        try:
            ds = datasets.load_dataset(name, source.config, split=source.hub_split, revision=commit, streaming=True)
        except Exception as e:
            raise CorpusError(f"hub dataset {name!r} could not be loaded (the machine may be offline): "
                              f"{type(e).__name__}: {e}") from e
        for i, record in enumerate(ds):
            yield f"{file.path} row {i}", record
        return
    path = Path(file.path)
    if file.format == "jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path} line {lineno}", _loads(line, f"{path} line {lineno}")
    elif file.format == "json":
        yield from _iter_json_array(path)
    elif file.format == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    else:
        raise CorpusError(f"{path}: a chat corpus reads {CHAT_SUFFIXES} files, not {file.format}")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """The elements of a top-level JSON array, decoded one at a time (no whole-file tree)."""
    text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise CorpusError(f"{path}: a chat .json file must hold a JSON array of records")
    i += 1
    record = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise CorpusError(f"{path} record {record}: the file ends inside the array (truncated?)")
        if text[i] == "]":
            return
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path} record {record}: invalid JSON: {e.msg} (line {e.lineno})") from None
        yield f"{path} record {record}", value
        record += 1


# ----------------------------------------------------------------------------- records


def record_shape(record: Any, where: str) -> str:
    if isinstance(record, dict):
        for shape, (key, _, _) in SHAPES.items():
            if isinstance(record.get(key), list):
                return shape
    keys = sorted(record)[:20] if isinstance(record, dict) else type(record).__name__
    raise ChatRecordError(f"{where}: not a conversation: expected a 'messages' list of {{role, content}} or a "
                          f"'conversations' list of {{from, value}} (got {keys})")


def parse_conversation(record: Any, where: str, shape: str) -> list[dict[str, str]]:
    """A record of ``shape`` → ``[{role, content}]`` with checked roles and non-empty content."""
    own = record_shape(record, where)
    if own != shape:
        raise ChatRecordError(f"{where}: a {SHAPES[own][0]!r} record in a file of {SHAPES[shape][0]!r} records "
                              f"(mixed shapes in one file)")
    key, role_key, text_key = SHAPES[shape]
    out = []
    for turn, message in enumerate(record[key]):
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            raise ChatRecordError(f"{where} turn {turn}: expected an object with {role_key!r} and {text_key!r}")
        raw_role, content = message[role_key], message[text_key]
        role = SHAREGPT_ROLES.get(raw_role) if shape == "sharegpt" else raw_role if raw_role in ROLES else None
        if role is None:
            known = sorted(SHAREGPT_ROLES) if shape == "sharegpt" else list(ROLES)
            raise ChatRecordError(f"{where} turn {turn}: unknown role {raw_role!r} (known: {known})")
        if not isinstance(content, str) or not content.strip():
            raise ChatRecordError(f"{where} turn {turn}: empty content ({role} turn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatRecordError(f"{where}: no assistant turn, nothing to train on")
    return out


def split_key(messages: Sequence[dict[str, str]]) -> str:
    """The text a conversation's train/validation side is hashed from (`packing.is_validation`)."""
    return json.dumps(list(messages), ensure_ascii=False, sort_keys=True)


# ----------------------------------------------------------------------------- rendering


def check_template(tokenizer: Any, template: str | None, where: str = "the teacher's tokenizer") -> None:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise CorpusError(f"{where} has no chat template: set corpus.chat.template to a Jinja chat template")
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError(f"{where} is not a fast tokenizer: chat rendering needs token offsets")


def render(messages: Sequence[dict[str, str]], tokenizer: Any, template: str | None, *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def render_conversation(messages: Sequence[dict[str, str]], tokenizer: Any, template: str | None, mask: str,
                        where: str, max_tokens: int | None = None) -> Rendered:
    """Token ids, loss mask and turn ends of one conversation (see the module docstring). ``mask``
    "all" marks every token, anything else every assistant turn (narrow it to the last turn with
    `last_turn_only`, after any truncation). With ``max_tokens``, a longer conversation's turn
    boundaries are found only up to the first turn that ends beyond that many tokens (what
    `truncate` can keep): ``turn_ends`` then cover a prefix of the turns."""
    try:
        full = render(messages, tokenizer, template)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        char_limit = offsets[max_tokens - 1][1] if max_tokens is not None and len(offsets) > max_tokens else None
        ends, heads = [], []
        for i, message in enumerate(messages):
            prefix = render(messages[: i + 1], tokenizer, template)
            head = render(messages[:i], tokenizer, template, generation_prompt=True) if message["role"] == "assistant" else None
            if not full.startswith(prefix) or (head is not None and not prefix.startswith(head)):
                raise ChatRecordError(f"{where} turn {i}: the chat template does not render turn by turn (the first "
                                      f"{i + 1} turns render to a text that does not start the whole conversation), "
                                      f"so its turn boundaries are unknown")
            ends.append(len(prefix))
            heads.append(None if head is None else len(head))
            if char_limit is not None and len(prefix) > char_limit:
                break  # later turns end later still: no truncation can keep them
    except ChatRecordError:
        raise
    except Exception as exc:  # jinja2 TemplateError (e.g. raise_exception on role order) and the like
        raise ChatRecordError(f"{where}: the chat template refused the conversation: {type(exc).__name__}: {exc}") from None
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in offsets], np.int64).reshape(-1)
    turn_ends = tuple(int(np.searchsorted(starts, e, side="left")) for e in ends)
    spans = [(h, e) for h, e in zip(heads, ends, strict=True) if h is not None]
    if mask == "all":
        loss = np.ones(len(ids), bool)
    else:
        loss = np.zeros(len(ids), bool)
        for h, e in spans:
            loss |= (starts >= h) & (starts < e)
    return Rendered(ids, loss, turn_ends, tuple(m["role"] == "assistant" for m in messages[: len(ends)]))


def last_turn_only(r: Rendered) -> Rendered:
    """The mask of the last assistant turn alone (of an assistant-masked rendering)."""
    last = max(i for i, asst in enumerate(r.assistant) if asst)
    start = r.turn_ends[last - 1] if last > 0 else 0
    loss = r.mask.copy()
    loss[:start] = False
    loss[r.turn_ends[last]:] = False
    return Rendered(r.ids, loss, r.turn_ends, r.assistant)


def truncate(r: Rendered, limit: int) -> Rendered | None:
    """The longest prefix of whole turns that fits ``limit`` tokens and ends with an assistant
    turn; None when even the first such prefix is too long. Takes an unrestricted mask ("assistant"
    or "all"): apply `last_turn_only` after it."""
    keep = [i for i, (end, asst) in enumerate(zip(r.turn_ends, r.assistant, strict=True)) if asst and end <= limit]
    if not keep:
        return None
    n = r.turn_ends[keep[-1]]
    return Rendered(r.ids[:n], r.mask[:n].copy(), r.turn_ends[: keep[-1] + 1], r.assistant[: keep[-1] + 1])
