"""Deterministic, resumable, shardable batch streams for one task.

Sample i of a task is a pure function of (seed, task, i): its RNG picks the source item and
every augmentation. So the data position of a run is just the number of batches consumed,
resume needs no loader state, and DataLoader workers or distributed workers split the same
sequence without coordination. Unusable items (corrupt files, images too small, no colour)
are skipped with a reason, reported once per item, and the sample is redrawn.

With shared picks (`pick_id`, data.shared_draws) the item of slot j of batch b is drawn from
a pick RNG of (seed, pick_id, b, j, attempt) that every task reading the source shares, and
only the augmentation from the task's own; `JointStream` then draws one step of all those
tasks at once, so an item they share is decoded once.
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
# (picklable: it runs in DataLoader workers), or SkipSample for an item it cannot use. It must
# not modify the item: caches and the other tasks of a step hold the same array.
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


class Batches(IterableDataset):
    """Batches start_batch, start_batch+1, ... (to stop_batch); DataLoader worker w of n
    makes every n-th, from start_batch + w."""
    start_batch: int
    stop_batch: int | None

    def batch(self, b: int) -> Any:
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + wid
        while self.stop_batch is None or b < self.stop_batch:
            yield self.batch(b)
            b += nw


class TaskStream(Batches):
    """Yields batch dicts; batch b holds samples b*B .. b*B+B-1 (this shard's slice of them).

    shard=(k, n): this process makes the k-th of n equal slices of every global batch, so n
    distributed workers together see exactly the samples a single process would.
    holdout=(every, split): with every >= 2, source items every-1, 2*every-1, ... are held out;
    split "train" never draws them, split "holdout" draws only them. every 0: all items.
    pick_id: None, the sample's own RNG picks its item; else the shared pick stream's id.
    """

    def __init__(self, *, source, sampler: Sampler, batch_size: int, seed: int, stream_id: int,
                 start_batch: int = 0, stop_batch: int | None = None,
                 shard: tuple[int, int] = (0, 1), cache_items: int = 0,
                 holdout: tuple[int, str] = (0, "train"), pick_id: int | None = None):
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
        self.cache_items, self.pick_id = cache_items, pick_id
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._bad: dict[int, str] = {}

    def _cached(self, idx: int):
        if idx in self._cache:
            self._cache.move_to_end(idx)
            return self._cache[idx]
        item = self.source.load(idx)
        if self.cache_items:
            self._cache[idx] = item
            if len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return item

    def _load(self, idx: int, step: dict[int, Any] | None):
        """`step`: what the streams drawing this step together loaded so far (index -> item,
        or the BadImage it raised), so each item is decoded once per step whoever needs it."""
        if step is None:
            return self._cached(idx)
        if idx not in step:
            try:
                step[idx] = self._cached(idx)
            except BadImage as err:
                step[idx] = err
        if isinstance(step[idx], BadImage):
            raise step[idx]
        return step[idx]

    def _draw(self, i: int, attempt: int) -> tuple[int, np.random.Generator]:
        """The source item and the augmentation RNG of sample i's attempt."""
        rng = np.random.default_rng([self.seed, self.stream_id, i, attempt])
        if self.pick_id is None:  # the item is the first draw of the sample's own RNG
            return self.items[int(rng.integers(len(self.items)))], rng
        b, j = divmod(i, self.batch_size)
        pick = np.random.default_rng([self.seed, self.pick_id, b, j, attempt])
        return self.items[int(pick.integers(len(self.items)))], rng

    def sample(self, i: int, skipped: list[tuple[str, str]],
               step: dict[int, Any] | None = None) -> dict[str, Any]:
        # A skip moves only this task to its next attempt: with shared picks, another task's
        # slot keeps its own attempt's item, so no task's samples depend on another's skips.
        for attempt in range(MAX_REDRAWS):
            idx, rng = self._draw(i, attempt)
            if idx in self._bad:
                continue
            try:
                return self.sampler(self._load(idx, step), rng)
            except (BadImage, SkipSample) as err:
                self._bad[idx] = err.reason
                skipped.append((self.source.name(idx), err.reason))
        reasons = sorted(set(self._bad.values()))
        raise NoUsableData(f"no usable item after {MAX_REDRAWS} draws for sample {i}; "
                           f"{len(self._bad)} of {len(self.source)} items skipped ({', '.join(reasons)})")

    def batch(self, b: int, step: dict[int, Any] | None = None) -> dict[str, Any]:
        k, n = self.shard
        per = self.batch_size // n
        skipped: list[tuple[str, str]] = []
        first = b * self.batch_size + k * per
        with one_thread():
            out: dict[str, Any] = collate([self.sample(i, skipped, step)
                                           for i in range(first, first + per)])
        out["skipped"] = skipped
        return out


class JointStream(Batches):
    """Yields {task: batch b of its stream} for streams of one source with shared picks (a
    single process's training streams): step b of every task is drawn together, so an item
    that several tasks' slots pick is decoded once, in this process or in a DataLoader worker."""

    def __init__(self, streams: dict[str, TaskStream], *, start_batch: int = 0,
                 stop_batch: int | None = None):
        picks = {s.pick_id for s in streams.values()}
        if len(picks) != 1 or None in picks or len({id(s.source) for s in streams.values()}) != 1:
            raise ValueError("a joint stream joins streams of one source and one pick stream")
        self.streams, self.start_batch, self.stop_batch = streams, start_batch, stop_batch

    def batch(self, b: int) -> dict[str, dict[str, Any]]:
        step: dict[int, Any] = {}
        return {task: s.batch(b, step) for task, s in self.streams.items()}


def loader(stream: Batches, *, num_workers: int, pin_memory: bool = False,
           prefetch: int = 4) -> DataLoader:
    """Batches come out in order b, b+1, ... whatever the worker count (DataLoader keeps order).

    `pin_memory` (for a CUDA device): page-locked batches, so the copy to the device can overlap
    the step (`non_blocking`). `prefetch`: batches each worker keeps ready."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=prefetch if num_workers else None)
