"""A store's rows for `transformers.Trainer`-based trainers (HF `KDTrainer`, TRL `KDSFTTrainer`).

`StoreRows` is a store as a dataset of rows; `KDCollator` stacks rows into a batch. Under one
process any Trainer can read them. Under several processes (Accelerate, torchrun) a plain
Trainer would let Accelerate re-shard an iterable dataset: every rank decodes every row and
keeps 1/N, and a restart replays the stream from its start. `StoreRowsMixin` (mixed into
`KDTrainer`, hence into `KDSFTTrainer`) replaces that with what kdcache's own trainer does:

* each rank streams its own contiguous part of the store (`KDStream(rank, world_size)`), and
  Accelerate neither dispatches nor re-shards it, so every row is read exactly once per epoch
  across the ranks;
* the stream position (`KDStream.state_dict()`, a few integers) is written beside every
  Trainer checkpoint (`kd_stream_rank<r>.json`) and restored by
  `train(resume_from_checkpoint=...)`, so a resumed run takes the same batches as a straight one
  (no `skip_first_batches` replay).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import TrainerCallback

from kdstore.reader import StoreReader
from kdstore.torch_stream import POSITION_KEY, SKIPPED_KEY, WORKER_KEY, KDLoader, KDStream
from pipeline.config import ConfigError

STATE_FILE = "kd_stream_rank{rank}.json"


class StoreRows(IterableDataset):
    """The rows of a store, one dict of tensors per row, in `KDStream` order.

    Each row: `sample_id`, `input_ids` [T], `valid` [T], `loss_mask` [T] on a chat store, and the
    requested fields (`topk_ids` [T, k], `topk_logp` [T, k], `topk_tail` [T], `hidden_<L>` [T, d]...).
    Iterating it directly gives the whole store (rank 0 of 1); `KDTrainer` / `KDSFTTrainer`
    read it per rank through `loader()` instead.
    """

    def __init__(self, store: str | StoreReader, fields: Sequence[str], *, seed: int = 0, shuffle: bool = True,
                 buffer_rows: int = 256, block_rows: int = 64, on_corrupt: str = "raise",
                 joined: Sequence[str | StoreReader] = ()):
        super().__init__()
        self.joined = list(joined)  # the stores of teachers 1..n, row-aligned with this one
        self.on_corrupt = on_corrupt  # "skip": a shard that fails its digest check is left out, counted
        self.reader = store if isinstance(store, StoreReader) else StoreReader(store)
        mask = ["loss_mask"] if self.reader.spec.loss_mask else []  # a chat store: the tokens to learn
        self.names = list(dict.fromkeys(["input_ids", "valid", *mask, *fields]))
        self.seed, self.shuffle, self.buffer_rows = seed, shuffle, buffer_rows
        # rows are decoded block_rows at a time; the order does not depend on the block size
        self.stream = self.stream_for(block_rows, rank=0, world_size=1)

    @property
    def fields(self) -> list[str]:
        return list(self.stream.fields)

    def stream_for(self, batch_size: int, *, rank: int, world_size: int) -> KDStream:
        """A `KDStream` of these rows in batches of `batch_size`: rank `rank`'s part of `world_size`."""
        return KDStream(self.reader, self.names, batch_size, seed=self.seed, shuffle=self.shuffle,
                        buffer_rows=self.buffer_rows, rank=rank, world_size=world_size, on_corrupt=self.on_corrupt,
                        joined=self.joined)

    def loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> RankLoader:
        return RankLoader(self.stream_for(batch_size, rank=rank, world_size=world_size), num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _rows(self.stream)

    def hf_dataset(self) -> Any:
        """Epoch 0's rows as a `datasets.IterableDataset` (values as numpy arrays and lists), from a
        stream of its own (iterating it leaves this dataset's position alone).

        `datasets` formats upcast float16/int32, so the torch rows are the compact path."""
        from datasets import IterableDataset as HFIterableDataset

        def rows() -> Iterator[dict[str, Any]]:
            for row in _rows(self.stream_for(self.stream.batch_size, rank=0, world_size=1)):
                yield {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in row.items()}

        return HFIterableDataset.from_generator(rows)


def _rows(stream: KDStream) -> Iterator[dict[str, Any]]:
    for block in stream:
        block.pop(WORKER_KEY, None)
        block.pop(POSITION_KEY, None)
        stream.skipped.update(block.pop(SKIPPED_KEY, {}))
        if "sample_id" not in block:  # a skip report, no rows
            continue
        for i in range(len(block["sample_id"])):
            yield {name: value[i] for name, value in block.items()}


class KDCollator:
    """Rows (dicts) → one batch: tensors stacked on a new leading axis, anything else (text) listed."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in rows[0]:
            values = [row[name] for row in rows]
            if isinstance(values[0], torch.Tensor):
                out[name] = torch.stack(values)
            elif hasattr(values[0], "shape"):  # numpy rows from hf_dataset()
                out[name] = torch.stack([torch.as_tensor(v) for v in values])
            else:
                out[name] = values
        return out


class RankLoader:
    """One rank's batches of a `KDStream`, with a length (batches per epoch) and an exact state.

    The Trainer pulls exactly `len(self)` batches per epoch and never the one past the end, so
    the next epoch starts here, where a finished epoch is recognised from the stream position.
    """

    def __init__(self, stream: KDStream, num_workers: int = 0):
        self.stream = stream
        self.inner = KDLoader(stream, num_workers=num_workers)

    def worker_rows(self, rank: int) -> dict[int, int]:
        """Rows per epoch of each (rank, dataloader worker) stream of rank `rank`, by stream id."""
        s, workers = self.stream, self.stream.num_workers
        total, streams = s.rows_per_epoch(), s.world_size * workers
        ids = [rank * workers + w for w in range(workers)]
        return {i: (i + 1) * total // streams - i * total // streams for i in ids}

    def batches_per_epoch(self, rank: int) -> int:
        return sum(math.ceil(n / self.stream.batch_size) for n in self.worker_rows(rank).values())

    def __len__(self) -> int:
        return self.batches_per_epoch(self.stream.rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.stream
        if s._consumed and all(s._consumed.get(i, 0) == n for i, n in self.worker_rows(s.rank).items()):
            s._next_epoch()
        yield from self.inner

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class StreamStateCallback(TrainerCallback):
    """Writes each rank's stream position beside every checkpoint the Trainer saves."""

    def __init__(self, loader: RankLoader):
        self.loader = loader

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STATE_FILE.format(rank=self.loader.stream.rank))
        with open(path, "w") as f:
            json.dump(self.loader.state_dict(), f)


class StoreRowsMixin:
    """Per-rank `StoreRows` loading and exact resume for a `transformers.Trainer` subclass (see the module doc).

    Mixed in before `Trainer`: `class KDTrainer(StoreRowsMixin, Trainer)`. Datasets other than
    `StoreRows` take the Trainer's own path.
    """

    _kd_resume: str | None = None
    kd_loader: RankLoader | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._kd_resume = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self) -> Any:
        rows = self.train_dataset
        if not isinstance(rows, StoreRows):
            return super().get_train_dataloader()
        args = self.args
        loader = rows.loader(args.per_device_train_batch_size, rank=args.process_index, world_size=args.world_size,
                             num_workers=args.dataloader_num_workers)
        counts = {loader.batches_per_epoch(r) for r in range(args.world_size)}
        if len(counts) > 1:
            raise ConfigError(
                f"store {rows.reader.location.url!r}: {rows.reader.num_rows()} rows over {args.world_size} ranks "
                f"give {sorted(counts)} batches of {args.per_device_train_batch_size} per rank per epoch; "
                "every rank must take the same number of steps: change per_device_train_batch_size or the world size")
        if self._kd_resume is not None:
            path = os.path.join(self._kd_resume, STATE_FILE.format(rank=args.process_index))
            if not os.path.isfile(path):
                raise ConfigError(f"checkpoint {self._kd_resume!r} has no stream position {os.path.basename(path)!r}: "
                                  "it was not saved by a StoreRows trainer with this world size")
            with open(path) as f:
                loader.load_state_dict(json.load(f))
        if self.kd_loader is not None:
            self.remove_callback(StreamStateCallback)
        self.kd_loader = loader
        self.add_callback(StreamStateCallback(loader))
        return loader

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        if isinstance(dataloader, RankLoader):  # the stream position was restored: nothing to replay
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)
