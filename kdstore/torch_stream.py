"""KDStream: a resumable torch IterableDataset over a store (the only kdstore module with torch).

Each epoch the committed shards are shuffled with (seed, epoch); the concatenated row sequence
is cut into contiguous, balanced blocks, one per (rank, dataloader worker), so every row is
seen exactly once per epoch and each worker decodes only the shards its block touches. Within a
block rows go through a bounded shuffle buffer that starts handing rows out as it fills (the
first batch waits for about one shard, not for the buffer's worth of shards). The whole order
is a pure function of (seed, epoch, worker), computed on row *indices*, so resuming only needs
how many rows each worker has handed out: `state_dict()` is a few integers.

Multi-teacher: `joined` stores (made over the same corpus, see `kdstore.join`) are read by sample
id as each primary shard is loaded, in whichever process decodes it (dataloader workers
included), and their fields ride along under prefixed names (`t1/topk_ids`...). The primary
store alone decides the order, so its state is the whole state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdstore.errors import CorruptShardError
from kdstore.join import StoreJoin
from kdstore.reader import StoreReader

WORKER_KEY = "_kd_worker"
POSITION_KEY = "_kd_position"
SKIPPED_KEY = "_kd_skipped"  # corrupt shards a worker skipped since its last batch: {shard id: reason}


class KDStream(IterableDataset):
    """Batches of decoded store fields as torch tensors.

    Yields dicts: `sample_id` [B] plus each requested field with a leading batch axis
    (e.g. topk_ids [B,T,k] int32, topk_logp [B,T,k] float32, topk_tail [B,T] float32,
    input_ids [B,T] int64, hidden_<L> [B,T,d] float32), and with `joined` stores the fields
    named `t<i>/<field>` read from store i (teacher i) for the same sample ids.
    """

    def __init__(
        self,
        store: str | StoreReader,
        fields: Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        on_corrupt: str = "raise",
        joined: Sequence[str | StoreReader] = (),
    ):
        super().__init__()
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.reader = store if isinstance(store, StoreReader) else StoreReader(store)
        self.join: StoreJoin | None = None
        if joined:  # checks that the stores line up, and every field's store, now
            others = [r if isinstance(r, StoreReader) else StoreReader(r) for r in joined]
            self.join = StoreJoin([self.reader, *others], fields)
            fields = self.join.primary_fields
        names = list(dict.fromkeys(["sample_id", *fields]))
        self.reader.resolve(names)  # MissingFieldError now, not in a worker later
        self.primary_fields = names
        self.fields = names + (self.join.joined_names if self.join is not None else [])
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.buffer_rows = max(1, int(buffer_rows))
        if rank is None or world_size is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if distributed else 0
            world_size = dist.get_world_size() if distributed else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = drop_last
        self.shards = self.reader.shard_ids()
        self.shard_rows = np.array([self.reader.record(s).rows for s in self.shards], dtype=np.int64)
        self.epoch = 0
        self.num_workers = 1
        self._consumed: dict[int, int] = {}
        self.skipped: dict[str, str] = {}  # on_corrupt="skip": shard id -> why (for the run's summary)
        self._unreported: dict[str, str] = {}  # skipped in a worker process, not yet sent with a batch

    # ------------------------------------------------------------ order

    def worker_order(self, epoch: int, worker: int, total_workers: int) -> np.ndarray:
        """[n, 2] (shard index, row) pairs worker `worker` yields in `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.shard_rows[shard_order])])
        total = int(starts[-1])
        lo, hi = worker * total // total_workers, (worker + 1) * total // total_workers
        position = np.arange(lo, hi, dtype=np.int64)  # in the epoch's concatenated row sequence
        pos = np.searchsorted(starts, position, side="right") - 1  # which shard of shard_order
        rows, shards = position - starts[pos], shard_order[pos]
        if not self.shuffle or len(rows) < 2:
            return np.stack([shards, rows], axis=1)
        rows = _shuffle_runs(rows, pos, np.random.default_rng([self.seed, epoch, 2_000_003 + worker]))
        order = np.stack([shards, rows], axis=1)
        return order[_buffer_shuffle(len(order), self.buffer_rows, np.random.default_rng([self.seed, epoch, 1_000_003 + worker]))]

    # ------------------------------------------------------------ iteration

    def _worker_identity(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        wid = info.id if info is not None else 0
        return self.rank * workers + wid, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, total = self._worker_identity()
        self._check_topology(total)
        order = self.worker_order(self.epoch, worker, total)
        position = self._consumed.get(worker, 0)
        remaining = np.bincount(order[position:, 0], minlength=len(self.shards))
        cache: dict[int, dict[str, np.ndarray] | None] = {}
        rowmap: dict[int, np.ndarray] = {}  # compacted shards: shard row -> position in the cached arrays
        while position < len(order):
            stop = min(position + self.batch_size, len(order))
            if self.drop_last and stop - position < self.batch_size:
                break
            chunk = order[position:stop]
            for shard in np.unique(chunk[:, 0]):
                if shard not in cache:
                    cache[shard] = self._load(shard)
            kept = chunk[[cache[s] is not None for s in chunk[:, 0]]]  # rows of skipped corrupt shards drop out
            batch = _gather(cache, rowmap, kept, self.fields) if len(kept) else None
            for shard, count in zip(*np.unique(chunk[:, 0], return_counts=True), strict=True):
                remaining[shard] -= count
                if remaining[shard] == 0:
                    cache.pop(shard, None)
                    rowmap.pop(shard, None)
                elif cache[shard] is not None:
                    self._compact(cache, rowmap, int(shard), order[stop:], int(remaining[shard]))
            position = stop
            self._consumed[worker] = position
            if batch is None:
                continue
            batch[WORKER_KEY] = torch.tensor(worker)
            batch[POSITION_KEY] = torch.tensor(position)
            if self._unreported:
                batch[SKIPPED_KEY], self._unreported = self._unreported, {}
            yield batch
        if self._unreported:  # skips after a worker's last batch still reach the loader
            yield {SKIPPED_KEY: self._unreported}
            self._unreported = {}
        if get_worker_info() is None:
            self._next_epoch()

    def _compact(self, cache: dict, rowmap: dict[int, np.ndarray], shard: int, rest: np.ndarray, left: int) -> None:
        """Keep only the rows of a cached shard still to come once they are half of what it
        holds: rows linger in the shuffle buffer, and whole decoded shards held for a few of them
        would make memory grow with the number of shards the buffer spans (held rows stay under
        about twice those still to come, whatever the store's size)."""
        held = len(next(iter(cache[shard].values())))
        if held < 64 or left * 2 > held:
            return
        rows = np.unique(rest[rest[:, 0] == shard, 1])
        local = rowmap[shard][rows] if shard in rowmap else rows
        cache[shard] = {name: value[local] for name, value in cache[shard].items()}
        positions = np.full(int(self.shard_rows[shard]), -1, dtype=np.int64)
        positions[rows] = np.arange(len(rows))
        rowmap[shard] = positions

    def _load(self, shard: int) -> dict[str, np.ndarray] | None:
        try:
            rows = self.reader.read_shard(self.shards[shard], self.primary_fields)
            if self.join is not None:  # a corrupt shard of a joined store drops this shard too
                rows.update(self.join.read(rows))
            return rows
        except CorruptShardError as exc:
            if self.on_corrupt == "raise":
                raise
            warnings.warn(f"skipping corrupt shard ({exc})", stacklevel=2)
            self.skipped[self.shards[shard]] = str(exc)
            if get_worker_info() is not None:
                self._unreported[self.shards[shard]] = str(exc)
            return None

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._consumed = {}

    def _check_topology(self, total: int) -> None:
        expected = self.world_size * self.num_workers
        if self._consumed and total != expected:
            raise ValueError(
                f"KDStream state was saved with {expected} rank×worker streams, this run has {total}: "
                "resume with the same world size and num_workers"
            )

    def worker_rows(self, worker: int, total_workers: int) -> int:
        """Rows worker `worker` yields per epoch (its block's length, the same every epoch)."""
        total = self.rows_per_epoch()
        return (worker + 1) * total // total_workers - worker * total // total_workers

    def rows_per_epoch(self) -> int:
        """Rows of all ranks and workers in one epoch (before any corrupt shard is skipped)."""
        return int(self.shard_rows.sum())

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.reader.fingerprint,
            "seed": self.seed,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "consumed": {int(k): int(v) for k, v in self._consumed.items()},
            "shards": list(self.shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.reader.fingerprint:
            raise ValueError(f"stream state is for store fingerprint {state['fingerprint']}, not {self.reader.fingerprint}")
        if list(state["shards"]) != list(self.shards):
            raise ValueError("the store's committed shards changed since this state was saved; exact resume is impossible")
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"stream state has seed={state['seed']} world_size={state['world_size']}, "
                f"this stream seed={self.seed} world_size={self.world_size}"
            )
        self.epoch = int(state["epoch"])
        self.num_workers = int(state["num_workers"])
        self._consumed = {int(k): int(v) for k, v in state["consumed"].items()}


class KDLoader:
    """A DataLoader over a KDStream whose state_dict is exact with any number of workers.

    Workers hold copies of the stream, so the loader records, from each batch it hands out,
    how far that batch's worker has got; saving and resuming go through the stream.
    """

    def __init__(
        self,
        stream: KDStream,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str = "forkserver",
    ):
        # forkserver, not fork: workers start from a clean process, not from a parent whose
        # threads (zarr's event loop, Prefect, Dask) a fork would copy in a broken state.
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        if stream._consumed and stream.num_workers != max(1, num_workers):
            raise ValueError(f"stream state was saved with num_workers={stream.num_workers}, loader has {num_workers}")
        stream.num_workers = max(1, num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        for batch in loader:
            self.stream.skipped.update(batch.pop(SKIPPED_KEY, {}))
            if WORKER_KEY not in batch:  # a worker's last word: shards it skipped, no rows
                continue
            worker = int(batch.pop(WORKER_KEY))
            self.stream._consumed[worker] = int(batch.pop(POSITION_KEY))
            yield batch
        if self.num_workers > 0:
            self.stream._next_epoch()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def _buffer_shuffle(n: int, buffer_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation produced by streaming n items through a shuffle buffer of `buffer_rows` slots.

    Warm-up: the buffer starts with one item and, until its slots are all filled, takes in two
    items for each one it hands out (a new slot, and a refill of the slot just emptied); then one
    for one; when the input runs out, what it holds comes out in a seeded random order. So the
    first batch needs about twice its rows from the front of the input (the first shard),
    whatever the buffer's size. Computed without a loop: the item a step hands out is the last
    one put into the slot it picks (each slot's occupants, in step order).
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    size = max(1, buffer_rows)
    steps = min(size - 1, (n - 1) // 2)  # warm-up steps, each reading items 2i+1 and 2i+2
    if steps == size - 1:
        steps = max(steps, n - size)  # steady steps, each reading item size+i
    i = np.arange(steps, dtype=np.int64)
    picks = (rng.random(steps) * np.minimum(i + 2, size)).astype(np.int64)
    refill = np.where(i <= size - 2, 2 * i + 2, size + i)
    slots = min(size, steps + 1)
    first = np.maximum(2 * np.arange(slots, dtype=np.int64) - 1, 0)  # slot s is created holding item 2s-1 (slot 0: item 0)
    narrow = picks.astype(np.uint16) if size <= 1 << 16 else picks  # a radix sort
    by_slot = np.argsort(narrow, kind="stable")  # each slot's picking steps, in step order
    slot = picks[by_slot]
    new = np.ones(steps, dtype=bool)  # a slot's first pick: it hands out the item it was created with
    new[1:] = slot[1:] != slot[:-1]
    out = np.empty(n, dtype=np.int64)
    out[by_slot] = np.where(new, first[slot], refill[np.roll(by_slot, 1)])
    last = np.ones(steps, dtype=bool)  # a slot's last pick: it holds that step's refill at the end
    last[:-1] = new[1:]
    held = first.copy()
    held[slot[last]] = refill[by_slot[last]]
    read = 2 * steps + 1 if steps <= size - 1 else size + steps
    rest = np.concatenate([held, np.arange(read, n, dtype=np.int64)])
    out[steps:] = rest[rng.permutation(len(rest))]
    return out


def _shuffle_runs(values: np.ndarray, runs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`values` with each run of equal `runs` (sorted) shuffled in place of itself: the runs of
    one length as the rows of a matrix, each row shuffled on its own."""
    out = values.copy()
    starts = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
    lengths = np.diff(np.r_[starts, len(runs)])
    for length in np.unique(lengths):
        at = starts[lengths == length][:, None] + np.arange(length)
        out[at] = rng.permuted(values[at], axis=1)
    return out


def _gather(cache: dict[int, dict[str, np.ndarray]], rowmap: dict[int, np.ndarray], chunk: np.ndarray,
            fields: Sequence[str]) -> dict[str, torch.Tensor]:
    shards = chunk[:, 0]
    out = {}
    for name in fields:
        first = cache[shards[0]][name]
        dest = np.empty((len(chunk), *first.shape[1:]), dtype=first.dtype)
        for shard in np.unique(shards):
            mask = shards == shard
            rows = chunk[mask, 1]
            dest[mask] = cache[shard][name][rowmap[shard][rows] if shard in rowmap else rows]
        out[name] = dest.tolist() if dest.dtype == object else torch.from_numpy(dest)  # text: a list of str
    return out
