"""Deterministic, resumable, shardable batch streams for one task.

Sample i of a task is a pure function of (seed, task, i): its RNG picks the source item and
every augmentation. So the data position of a run is just the number of batches consumed,
resume needs no loader state, and DataLoader workers or distributed workers split the same
sequence without coordination. Unusable items (corrupt files, images too small, no colour)
are skipped with a reason, reported once per item, and the sample is redrawn.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtssl.data.images import BadImage

MAX_REDRAWS = 64

# What a task gives the stream: one source item + the sample's RNG -> one training sample
# (picklable: it runs in DataLoader workers), or SkipSample for an item it cannot use.
Sampler = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


class SkipSample(Exception):
    """A source item this task cannot use (too small, no colour, ...): counted, then redrawn."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NoUsableData(RuntimeError):
    pass


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    # np.stack copies, so read-only arrays from sources never reach torch.
    return {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


class HoldoutSplit:
    """The source indices of one split, as a sequence: every `every`-th item is held out.

    A fixed arithmetic rule, not a stored list: every process and every resume agrees, and a
    source that grows keeps its earlier items in the same split."""

    def __init__(self, n: int, every: int, split: str):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        self.every, self.split = (every, split) if every >= 2 else (0, "train")
        held = n // every if self.every else 0
        self.n = held if self.split == "holdout" else n - held

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> int:
        if not self.every:
            return j
        if self.split == "holdout":
            return j * self.every + self.every - 1
        return j + j // (self.every - 1)  # skip the last item of every block of `every`


@contextmanager
def one_thread():
    """Samplers run many tiny torch ops: a thread pool only adds wake-ups to each (measured
    10x slower per sample with 2 threads on a busy 2-core machine). DataLoader workers are
    single-threaded already; this gives in-process sampling the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TaskStream(IterableDataset):
    """Yields batch dicts; batch b holds samples b*B .. b*B+B-1 (this shard's slice of them).

    shard=(k, n): this process makes the k-th of n equal slices of every global batch, so n
    distributed workers together see exactly the samples a single process would.
    holdout=(every, split): with every >= 2, source items every-1, 2*every-1, ... are held out;
    split "train" never draws them, split "holdout" draws only them. every 0: all items.
    """

    def __init__(self, *, source, sampler: Sampler, batch_size: int, seed: int, stream_id: int,
                 start_batch: int = 0, stop_batch: int | None = None,
                 shard: tuple[int, int] = (0, 1), cache_items: int = 0,
                 holdout: tuple[int, str] = (0, "train")):
        k, n = shard
        if not (0 <= k < n) or batch_size % n:
            raise ValueError(f"shard {shard} must split batch size {batch_size} evenly")
        if len(source) == 0:
            raise NoUsableData("the data source holds no items")
        self.items = HoldoutSplit(len(source), *holdout)
        if len(self.items) == 0:
            raise NoUsableData(f"the {holdout[1]} split of {len(source)} items holds none "
                               f"(one item in {holdout[0]} is held out)")
        self.source, self.sampler = source, sampler
        self.batch_size, self.seed, self.stream_id = batch_size, seed, stream_id
        self.start_batch, self.stop_batch, self.shard = start_batch, stop_batch, shard
        self.cache_items = cache_items
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bad: dict[int, str] = {}

    def _load(self, idx: int):
        if idx in self._cache:
            self._cache.move_to_end(idx)
            return self._cache[idx]
        item = self.source.load(idx)
        if self.cache_items:
            self._cache[idx] = item
            if len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return item

    def sample(self, i: int, skipped: list[tuple[str, str]]) -> dict[str, Any]:
        for attempt in range(MAX_REDRAWS):
            rng = np.random.default_rng([self.seed, self.stream_id, i, attempt])
            idx = self.items[int(rng.integers(len(self.items)))]
            if idx in self._bad:
                continue
            try:
                return self.sampler(self._load(idx), rng)
            except (BadImage, SkipSample) as err:
                self._bad[idx] = err.reason
                skipped.append((self.source.name(idx), err.reason))
        reasons = sorted(set(self._bad.values()))
        raise NoUsableData(f"no usable item after {MAX_REDRAWS} draws for sample {i}; "
                           f"{len(self._bad)} of {len(self.source)} items skipped ({', '.join(reasons)})")

    def batch(self, b: int) -> dict[str, Any]:
        k, n = self.shard
        per = self.batch_size // n
        skipped: list[tuple[str, str]] = []
        first = b * self.batch_size + k * per
        with one_thread():
            out: dict[str, Any] = collate([self.sample(i, skipped)
                                           for i in range(first, first + per)])
        out["skipped"] = skipped
        return out

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + wid
        while self.stop_batch is None or b < self.stop_batch:
            yield self.batch(b)
            b += nw


def loader(stream: TaskStream, *, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches come out in order b, b+1, ... whatever the worker count (DataLoader keeps order).

    `pin_memory` (for a CUDA device): page-locked batches, so the copy to the device can overlap
    the step (`non_blocking`)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
