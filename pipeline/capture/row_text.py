"""The text behind a row of tokens, and where each token ends in it.

A store made with one tokenizer serves a student with another only if the student can re-tokenise
exactly the span of text a row covers and say which of its positions predict the same point of
that text as a teacher position. So a row keeps its text (the pieces of its tokens, joined) and
the character end of every token in it. A token's piece runs from the previous token's end to
its own: offsets that tokenizers trim (a leading space) or share (two byte-level tokens of one
character) still tile the text, and the last piece of a document runs to the document's end.
Special tokens (EOS between documents, padding) have empty pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def piece_ends(offsets: Sequence[tuple[int, int]], text_length: int) -> np.ndarray:
    """Character end of each token's piece from a tokenizer's offset mapping (non-decreasing;
    the last one is the text's end)."""
    if not len(offsets):
        return np.zeros(0, np.int64)
    ends = np.maximum.accumulate(np.array([end for _, end in offsets], np.int64))
    ends = np.minimum(ends, text_length)
    ends[-1] = text_length
    return ends


def offsets_of(tokenizer: object, encoding: Mapping[str, object], index: int, where: str) -> list[tuple[int, int]]:
    """The offset mapping of document `index` of a batch encoding (a fast tokenizer's)."""
    offsets = encoding.get("offset_mapping") if isinstance(encoding, Mapping) else None
    if offsets is None:
        raise ValueError(f"{where}: tokenizer {type(tokenizer).__name__} gives no character offsets "
                         "(a 'fast' tokenizer is needed to store row text)")
    return offsets[index]  # type: ignore[index]


def join_rows(texts: Mapping[int, str], doc: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of text and per-token character ends from per-token spans.

    doc, start, end [N, T]: the document (key of `texts`, -1 = padding) and the piece's span in it.
    Returns text [N] (object array of str) and char_end [N, T] int32 (ends within the row text).
    """
    n_rows, T = doc.shape
    text = np.empty(n_rows, dtype=object)
    char_end = np.zeros((n_rows, T), np.int32)
    for r in range(n_rows):
        parts: list[str] = []
        length = 0
        t = 0
        while t < T:
            d = int(doc[r, t])
            stop = t + 1
            while stop < T and doc[r, stop] == d:
                stop += 1
            if d < 0:
                char_end[r, t:stop] = length
            else:
                first = int(start[r, t])
                parts.append(texts[d][first:int(end[r, stop - 1])])
                char_end[r, t:stop] = length + end[r, t:stop] - first
                length += len(parts[-1])
            t = stop
        text[r] = "".join(parts)
    return text, char_end
