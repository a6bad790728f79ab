"""Join several stores made over the same corpus, by sample id (multi-teacher distillation).

Stores cached by different teachers over the same corpus, with the same tokenizer and packing,
hold the same rows under the same sample ids, so a student can learn from all of them at once
without any teacher resident. Nothing is copied: each store stays what it is, and the join is
done per shard while streaming.

Naming: teacher 0 (the primary store, whose stream gives the row order) keeps the plain field
names; the fields of teacher i ≥ 1 are named with the prefix `t<i>/` (`t1/topk_ids`,
`t1/topk_logp`, `t1/topk_tail`...). Those prefixed names are the one vocabulary shared by the
stream (which fields to read from which store) and the losses (which fields they need).

`check_aligned` refuses stores that cannot be joined, naming the stores and what differs; the
join itself re-checks every joined row (input_ids and valid must equal the primary's), because
equal provenance does not prove equal content (a corpus file edited between two cache runs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdstore.errors import MissingFieldError, StoreMismatchError
from kdstore.reader import StoreReader
from kdstore.records import add_hashes

_PREFIXED = re.compile(r"^t([1-9][0-9]*)/(.+)$")
ROW_FIELDS = ("input_ids", "valid")  # what makes two rows the same row: compared on every join
EXAMPLES = 5


def prefixed(teacher: int, name: str) -> str:
    """The batch / field name of store field `name` of teacher `teacher` (0 = plain)."""
    return name if teacher == 0 else f"t{teacher}/{name}"


def split_field(name: str) -> tuple[int, str]:
    """`t2/topk_ids` → (2, "topk_ids"); a plain name → (0, name)."""
    match = _PREFIXED.match(name)
    return (int(match.group(1)), match.group(2)) if match else (0, name)


def joined_field_names(readers: Sequence[StoreReader]) -> list[str]:
    """Every field name of the joined store set: teacher 0's plain, the others prefixed."""
    return [prefixed(i, name) for i, r in enumerate(readers) for name in r.field_names]


def _label(reader: StoreReader, teacher: int) -> str:
    return f"store {reader.location.url!r} (teacher {teacher})"


def _mapping_diff(section: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not keys:
        return None
    values = ", ".join(f"{k}: {b.get(k)!r} vs {a.get(k)!r}" for k in keys)
    return f"provenance {section} differs at key(s) {keys} ({values})"


def _id_hash(reader: StoreReader) -> tuple[int, int] | None:
    """(rows, hash of every sample id) from the store's commit records alone; None when a
    record predates the hash (the ids are then read)."""
    records = [reader.record(s) for s in reader.shard_ids()]
    if any(r.sample_id_hash is None for r in records):
        return None
    return sum(r.rows for r in records), add_hashes(r.sample_id_hash for r in records)


def _id_diff(base: StoreReader, other: StoreReader, teacher: int) -> list[str]:
    """What sample ids one store lacks of the other's: compared by the hashes the commit
    records carry, and the ids read only when those differ (to name them) or are missing."""
    hashes = _id_hash(base), _id_hash(other)
    if None not in hashes and hashes[0] == hashes[1]:
        return []
    ours, theirs = base.sample_ids(), other.sample_ids()
    out = []
    a, b = _label(base, 0), _label(other, teacher)
    for name, have, source, want in ((b, theirs, a, ours), (a, ours, b, theirs)):
        missing = np.setdiff1d(want, have)
        if len(missing):
            out.append(f"{name} lacks {len(missing)} of the {len(np.unique(want))} sample ids of {source} "
                       f"(e.g. {missing[:EXAMPLES].tolist()})")
    return out


def check_aligned(readers: Sequence[StoreReader]) -> None:
    """Raise `StoreMismatchError` unless every store lines up with the first (teacher 0).

    Lining up = same vocabulary (size and tokenizer digest), same row length, same provenance
    corpus and packing, and the same set of committed sample ids. Teachers, signals, k and
    codecs may differ. The message names each store and what differs; the sample ids are only
    compared when everything else agrees (otherwise their difference is a consequence).
    """
    if len(readers) < 2:
        return
    base = readers[0]
    problems = []
    for i, other in enumerate(readers[1:], 1):
        a, b = base.spec, other.spec
        tok_a = base.meta.provenance.teacher.get("tokenizer_sha256")
        tok_b = other.meta.provenance.teacher.get("tokenizer_sha256")
        if a.vocab_size != b.vocab_size or (tok_a and tok_b and tok_a != tok_b):
            raise StoreMismatchError(
                f"{_label(other, i)} has vocabulary size {b.vocab_size} (tokenizer {str(tok_b)[:12]}), "
                f"{_label(base, 0)} {a.vocab_size} (tokenizer {str(tok_a)[:12]}): joined stores must share "
                "one tokenizer; cross-tokenizer distillation needs an alignment method (not supported here)"
            )
        diffs = []
        if a.row_length != b.row_length:
            diffs.append(f"row_length {b.row_length} vs {a.row_length}")
        for section in ("corpus", "packing"):
            ours, theirs = (getattr(r.meta.provenance, section) for r in (base, other))
            if diff := _mapping_diff(section, ours, theirs):
                diffs.append(diff)
        if not diffs:
            diffs = _id_diff(base, other, i)
        if diffs:
            problems.append(f"{_label(other, i)} vs {_label(base, 0)}: " + "; ".join(diffs))
    if problems:
        raise StoreMismatchError("stores to join do not line up: " + " | ".join(problems))


class StoreJoin:
    """Reads the other teachers' fields for the rows of the primary store, by sample id.

    `fields` are joined names (plain = teacher 0, `t<i>/name` = teacher i). `primary_fields` is
    what to read from the primary store (always with sample_id and the row fields); `read`
    takes those decoded rows and returns the prefixed fields of the other stores for the same
    sample ids, in the same order, after checking that each row's tokens are the primary's.
    """

    def __init__(self, readers: Sequence[StoreReader], fields: Sequence[str], check: bool = True):
        if not readers:
            raise ValueError("StoreJoin needs at least the primary store")
        self.readers = list(readers)
        if check:
            check_aligned(self.readers)
        primary: list[str] = ["sample_id", *ROW_FIELDS]
        extra: dict[int, list[str]] = {}
        for name in fields:
            teacher, base = split_field(name)
            if teacher == 0:
                primary.append(base)
            elif teacher >= len(self.readers):
                raise MissingFieldError(
                    f"field {name!r} belongs to teacher {teacher}, but only {len(self.readers)} store(s) are "
                    f"joined (teachers 0..{len(self.readers) - 1}): add the store to the joined stores"
                )
            else:
                extra.setdefault(teacher, []).append(base)
        self.primary_fields = list(dict.fromkeys(primary))
        self.readers[0].resolve(self.primary_fields)
        self.extra_fields = {i: list(dict.fromkeys(names)) for i, names in sorted(extra.items())}
        for i, names in self.extra_fields.items():
            self.readers[i].resolve([*names, *ROW_FIELDS])  # MissingFieldError naming that store
        self.joined_names = [prefixed(i, n) for i, names in self.extra_fields.items() for n in names]

    def read(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The other stores' fields (prefixed) for the primary `rows` (sample_id, input_ids, valid)."""
        ids = np.asarray(rows["sample_id"])
        out: dict[str, np.ndarray] = {}
        for i, names in self.extra_fields.items():
            reader = self.readers[i]
            try:
                got = reader.read_samples(ids, list(dict.fromkeys([*names, *ROW_FIELDS])))
            except KeyError as exc:
                primary = _label(self.readers[0], 0)
                raise StoreMismatchError(f"{_label(reader, i)} cannot join {primary}: {exc}") from None
            for key in ROW_FIELDS:
                bad = np.flatnonzero((got[key] != np.asarray(rows[key])).reshape(len(ids), -1).any(-1))
                if len(bad):
                    raise StoreMismatchError(
                        f"sample id(s) {ids[bad][:EXAMPLES].tolist()}: {key} of {_label(reader, i)} differ from "
                        f"{_label(self.readers[0], 0)}: the stores do not hold the same rows"
                    )
            out.update({prefixed(i, n): got[n] for n in names})
        return out
