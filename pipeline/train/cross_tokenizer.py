"""Students with their own tokenizer: re-tokenise the store's rows and line the two up.

A store row keeps its text and each teacher token's character end (`pipeline.capture.row_text`). For a
student with another vocabulary, `Retokenizer` re-tokenises every document segment of a row with
the student's tokenizer (the student's EOS where the teacher's stood between documents) and
aligns positions by the point of the text they predict from: teacher position t predicts the
text after `char_end[t]`, student position s the text after its own token's end, so the two are
paired when those character positions are equal (an EOS and the token before it share a position
and are told apart by being EOS). Only paired positions carry teacher signals; the others learn
from the student's own loss.

The student's batch replaces `input_ids`, `valid`, `doc_ids` with the student's [B, L] tensors
and adds `align_pos` [B, L] (the paired teacher position, -1 if none); the teacher's own are kept
as `teacher_input_ids`, `teacher_valid`, `teacher_doc_ids`. Every other store field (top-k,
hidden states) stays in teacher positions [B, T, ...].

Also here: the vocabulary map from teacher ids to student ids that the token-alignment baseline
uses, and the initialisation of a teacher-layer student's new embedding rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.capture.row_text import piece_ends
from pipeline.config import ConfigError

TEACHER_PREFIX = "teacher_"
ROW_FIELDS = ("input_ids", "valid", "doc_ids")
STORE_FIELDS = ("text", "char_end", *ROW_FIELDS)


class CrossTokenizerError(ConfigError):
    """A cross-tokenizer setup that cannot work (names the tokenizer, the store or the row)."""


@dataclass(frozen=True)
class Retokenizer:
    tokenizer: Any  # the student's (a fast tokenizer: character offsets are needed)
    teacher_eos: int
    max_length: int  # student rows longer than this are cut (counted in `truncated`)

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise CrossTokenizerError(f"student tokenizer {type(self.tokenizer).__name__} has no eos token: "
                                      "it is needed between documents")
        if not getattr(self.tokenizer, "is_fast", False):
            raise CrossTokenizerError("the student tokenizer must be a fast tokenizer (character offsets)")

    def row(self, text: str, char_end: np.ndarray, ids: np.ndarray, valid: np.ndarray,
            doc_ids: np.ndarray) -> tuple[list[int], list[int], list[int]]:
        """One row: student ids, their documents and their paired teacher positions (-1: none)."""
        is_eos = ids == self.teacher_eos
        keys = {(int(char_end[t]), bool(is_eos[t])): t for t in np.flatnonzero(valid)}
        out_ids: list[int] = []
        out_docs: list[int] = []
        out_align: list[int] = []
        t, T = 0, len(ids)
        while t < T:
            if not valid[t]:
                t += 1
                continue
            stop = t + 1
            while stop < T and valid[stop] and doc_ids[stop] == doc_ids[t]:
                stop += 1
            start = int(char_end[t - 1]) if t > 0 else 0
            end = int(char_end[stop - 1])
            body = text[start:end]
            enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
            ends = (piece_ends(enc["offset_mapping"], len(body)) + start).tolist()
            pieces = [(i, e, False) for i, e in zip(enc["input_ids"], ends, strict=True)]
            if is_eos[stop - 1]:
                pieces.append((self.tokenizer.eos_token_id, end, True))
            for token, e, eos in pieces:
                out_ids.append(int(token))
                out_docs.append(int(doc_ids[t]))
                out_align.append(keys.get((e, eos), -1))
            t = stop
        return out_ids, out_docs, out_align

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [f for f in STORE_FIELDS if f not in batch]
        if missing:
            raise CrossTokenizerError(f"a student with its own tokenizer needs store field(s) {missing}: cache the "
                                      "store with `signals: {text: true}`")
        arrays = {k: batch[k].numpy() for k in ("char_end", *ROW_FIELDS)}
        rows = [self.row(batch["text"][r], arrays["char_end"][r], arrays["input_ids"][r], arrays["valid"][r].astype(bool),
                         arrays["doc_ids"][r]) for r in range(len(batch["text"]))]
        length = max(1, min(self.max_length, max(len(ids) for ids, _, _ in rows)))
        ids = torch.full((len(rows), length), self.tokenizer.eos_token_id, dtype=torch.long)
        docs = torch.full((len(rows), length), -1, dtype=torch.int32)
        align = torch.full((len(rows), length), -1, dtype=torch.long)
        valid = torch.zeros((len(rows), length), dtype=torch.bool)
        truncated = 0
        for r, (row_ids, row_docs, row_align) in enumerate(rows):
            n = min(length, len(row_ids))
            truncated += len(row_ids) - n
            ids[r, :n] = torch.tensor(row_ids[:n])
            docs[r, :n] = torch.tensor(row_docs[:n], dtype=torch.int32)
            align[r, :n] = torch.tensor(row_align[:n])
            valid[r, :n] = True
        out = {k: v for k, v in batch.items() if k not in ROW_FIELDS and k != "text"}
        out.update({TEACHER_PREFIX + k: batch[k] for k in ROW_FIELDS})
        out.update(input_ids=ids, valid=valid, doc_ids=docs, align_pos=align)
        out["truncated_tokens"] = torch.tensor(truncated)
        return out


def retokenizer(student_tokenizer: Any, reader: Any, max_length: int | None) -> Retokenizer:
    """The Retokenizer for a store (its tokenizer's EOS) and a student (default length 2 × row)."""
    from pipeline.capture.teacher_files import store_tokenizer

    missing = [f for f in STORE_FIELDS if f not in reader.field_names]
    if missing:
        raise CrossTokenizerError(f"store {reader.location.url!r} has no field(s) {missing}: a student with its own "
                                  "tokenizer re-tokenises each row's text; cache the store with `signals: {text: true}`")
    eos = store_tokenizer(reader).eos_token_id
    if eos is None:
        raise CrossTokenizerError(f"the tokenizer of store {reader.location.url!r} has no eos token")
    return Retokenizer(student_tokenizer, int(eos), max_length or 2 * reader.spec.row_length)


def token_texts(tokenizer: Any) -> list[str]:
    """The text of every id of `tokenizer` (byte-level pieces decoded; specials as written)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]


def vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, method: str = "first_token") -> torch.Tensor:
    """[V_teacher] student id for every teacher id.

    first_token: the first student token of the teacher token's text (what the student would
    predict first if the teacher's token came next); min_edit: the student token whose text is
    nearest in edit distance (exact matches first; FuseLLM's MinED). The teacher's EOS maps to the
    student's; a teacher token whose text the student cannot tokenise maps to the student's EOS.
    """
    texts = token_texts(teacher_tokenizer)
    eos = int(student_tokenizer.eos_token_id)
    if method == "first_token":
        enc = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = [ids[0] if ids else eos for ids in enc]
    elif method == "min_edit":
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        student_texts = token_texts(student_tokenizer)
        exact = {t: i for i, t in reversed(list(enumerate(student_texts)))}
        out = [exact.get(t, -1) for t in texts]
        todo = [i for i, s in enumerate(out) if s < 0]
        for start in range(0, len(todo), 2048):
            chunk = todo[start:start + 2048]
            dist = cdist([texts[i] for i in chunk], student_texts, scorer=Levenshtein.distance, dtype=np.int32,
                         workers=-1)
            for i, j in zip(chunk, dist.argmin(axis=1), strict=True):
                out[i] = int(j)
    else:
        raise CrossTokenizerError(f"unknown vocab map method {method!r}; known: first_token, min_edit")
    mapped = torch.tensor(out, dtype=torch.long)
    if teacher_tokenizer.eos_token_id is not None:
        mapped[int(teacher_tokenizer.eos_token_id)] = eos
    return mapped


@torch.no_grad()
def init_foreign_embeddings(model: Any, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Give a teacher-layer student the student tokenizer's vocabulary: each new embedding row is
    the mean of the teacher's embeddings of the teacher tokens of that student token's text (the
    EOS row is the teacher's EOS row); tied output heads follow."""
    old = model.get_input_embeddings().weight.detach().clone()
    texts = token_texts(student_tokenizer)
    enc = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mean = old.mean(0)
    rows = torch.stack([old[torch.tensor(ids)].mean(0) if ids else mean for ids in enc])
    eos_s, eos_t = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if eos_s is not None and eos_t is not None:
        rows[eos_s] = old[eos_t]
    model.resize_token_embeddings(len(student_tokenizer), mean_resizing=False)
    model.get_input_embeddings().weight.copy_(rows)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        head.weight.copy_(rows)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(student_tokenizer, key, None)
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
