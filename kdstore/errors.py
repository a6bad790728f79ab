"""Errors raised by kdstore.

One small hierarchy so callers can catch "anything wrong with a store" in one place, while each
message still names what is wrong and where (store, shard, file, field).
"""


class StoreError(Exception):
    """Base class: something about a store is wrong."""


class NotAStoreError(StoreError):
    """The path holds no `store.json`."""


class FormatVersionError(StoreError):
    """The store was written by a newer kdcache format than this reader understands."""


class FingerprintMismatchError(StoreError):
    """A writer or shard belongs to another spec/provenance than the store."""


class SpecError(StoreError, ValueError):
    """A spec is malformed (unknown key, bad value)."""


class ShardDataError(StoreError, ValueError):
    """Rows handed to the writer have a missing field, a wrong shape or a wrong dtype."""


class MissingFieldError(StoreError, KeyError):
    """A reader asked for a field the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CorruptShardError(StoreError):
    """A committed shard has a missing, truncated or altered file."""


class StoreWriteError(StoreError):
    """A shard could not be written (disk full, quota, a failed upload): nothing committed was
    touched, the staged shard is gone, and a re-run resumes where this one stopped."""


class NotEnoughSpaceError(StoreWriteError):
    """The disk holding a store has less free space than the pass is expected to write."""


class StoreMismatchError(StoreError, ValueError):
    """Stores to be joined (multi-teacher) do not line up: another vocabulary, corpus, packing,
    row length or set of sample ids, or a joined row whose tokens differ."""
