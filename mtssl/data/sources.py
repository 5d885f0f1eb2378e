"""The data sources named in the config: a folder, or the embedded default."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mtssl.config import Config, DataConfig
from mtssl.data.stream import JointStream, TaskStream, loader

# The pick streams of shared draws (data.shared_draws), one per source kind, apart from every
# task's stream ids (task_id <= 999; + 1000 calibration, + 2000 health).
SHARED_PICKS = {"images": 3000, "frames": 3001}


def image_source(cfg: DataConfig):
    """'embedded', a dataset written by `mtssl prep` (path or s3:// URI), or a folder of images."""
    from mtssl.data.shards import ShardImages, is_prepared
    if cfg.images == "embedded":
        from mtssl.data.embedded import embedded_photos
        return embedded_photos()
    if is_prepared(cfg.images):
        return ShardImages(cfg.images)
    from mtssl.data.images import FolderImages
    return FolderImages(cfg.images)


def frame_source(cfg: DataConfig):
    """'embedded', a dataset written by `mtssl prep`, or a folder of frames with masks."""
    from mtssl.data.shards import ShardFrames, is_prepared
    if cfg.frames == "embedded":
        from mtssl.data.embedded import synthetic_motion_clips
        return synthetic_motion_clips()[0]
    if is_prepared(cfg.frames):
        return ShardFrames(cfg.frames)
    from mtssl.data.images import FramesWithMasks
    return FramesWithMasks.from_folder(cfg.frames)


def source_for(kind: str, cfg: DataConfig):
    return image_source(cfg) if kind == "images" else frame_source(cfg)


class TaskData:
    """Builds the batch streams of a config's tasks, sharing one source per kind."""

    def __init__(self, cfg: Config):
        from mtssl.models.multitask import build_trunk, trunk_info
        self.cfg = cfg
        self.sources: dict[str, object] = {}
        # Heads' and samplers' view of the trunk, from a trunk on the meta device: no memory used.
        with torch.device("meta"):
            self.trunk = trunk_info(cfg, build_trunk(cfg))

    def source(self, kind: str):
        if kind not in self.sources:
            self.sources[kind] = source_for(kind, self.cfg.data)
        return self.sources[kind]

    def stream(self, task: str, *, start_batch: int = 0, stop_batch: int | None = None,
               stream_offset: int = 0, shard: tuple[int, int] = (0, 1),
               batch_size: int | None = None, split: str = "train") -> TaskStream:
        """stream_offset separates draws (training 0; calibration and evaluation use others);
        split "holdout" draws only the items training never sees (data.holdout_every).

        With data.shared_draws the training streams of one source kind pick their items from
        one pick stream; calibration and health streams, drawn apart from the steps, keep
        their own picks."""
        from mtssl.tasks import TASKS
        tdef, tcfg = TASKS[task], getattr(self.cfg.tasks, task)
        sampler = tdef.build_sampler(tcfg, self.trunk, getattr(self.cfg.harmonization, task))
        shared = self.cfg.data.shared_draws and stream_offset == 0
        return TaskStream(source=self.source(tdef.source), sampler=sampler,
                          batch_size=batch_size or tcfg.batch_size, seed=self.cfg.seed,
                          stream_id=tdef.task_id + stream_offset,
                          start_batch=start_batch, stop_batch=stop_batch, shard=shard,
                          cache_items=self.cfg.data.image_cache,
                          holdout=(self.cfg.data.holdout_every, split),
                          pick_id=SHARED_PICKS[tdef.source] if shared else None)

    def joint_stream(self, tasks: list[str], *, start_batch: int = 0,
                     stop_batch: int | None = None) -> JointStream:
        """The training steps of `tasks` (one source kind, data.shared_draws on) drawn together."""
        return JointStream({t: self.stream(t) for t in tasks}, start_batch=start_batch,
                           stop_batch=stop_batch)

    def feeds(self, tasks: list[str], *, pin_memory: bool
              ) -> dict[str, TaskBatches | JointBatches]:
        """Each task's supplier of training batches in a single process: with
        data.shared_draws, one joint loader per source kind serves every task reading it (an
        item that several tasks pick in a step is decoded once); else each task its own."""
        from mtssl.tasks import TASKS
        if not self.cfg.data.shared_draws:
            return {t: TaskBatches(self, pin_memory=pin_memory) for t in tasks}
        kinds = {t: TASKS[t].source for t in tasks}
        joint = {kind: JointBatches(self, [t for t in tasks if kinds[t] == kind],
                                    pin_memory=pin_memory) for kind in set(kinds.values())}
        return {t: joint[kinds[t]] for t in tasks}


class TaskBatches:
    """One task's batches (one supplier per task): its own stream (`shard` of every global
    batch) through a loader of data.num_workers processes, reopened where the position moved
    (first round, resume, async)."""

    def __init__(self, data: TaskData, *, shard: tuple[int, int] = (0, 1),
                 pin_memory: bool = False):
        self.data, self.shard, self.pin_memory = data, shard, pin_memory
        self.batches: Iterator[dict] = iter(())
        self.expected: int | None = None  # the open loader's next batch index

    def batch(self, task: str, b: int) -> dict:
        if b != self.expected:
            stream = self.data.stream(task, start_batch=b, shard=self.shard)
            self.batches = iter(loader(stream, num_workers=self.data.cfg.data.num_workers,
                                       pin_memory=self.pin_memory))
        self.expected = b + 1
        return next(self.batches)


class JointBatches:
    """The batches of the tasks sharing one source's draws, from one loader of whole steps
    (JointStream). It gets data.num_workers processes per task, as many as the tasks' own
    loaders would have had; each decodes an item once for all the tasks of its step. Each
    worker keeps max(1, 4 // tasks) steps ready: for up to four tasks, no more batches in
    memory than the tasks' own loaders held (4 per worker)."""

    def __init__(self, data: TaskData, tasks: list[str], *, pin_memory: bool = False):
        self.data, self.tasks, self.pin_memory = data, tasks, pin_memory
        self.steps: Iterator[dict[str, dict]] = iter(())
        self.pending: dict[str, dict] = {}  # the batches of step `current` not yet handed out
        self.current: int | None = None
        self.next: int | None = None  # the open loader's next step

    def batch(self, task: str, b: int) -> dict:
        if b != self.current or task not in self.pending:
            if b != self.next:
                stream = self.data.joint_stream(self.tasks, start_batch=b)
                n = len(self.tasks)
                self.steps = iter(loader(stream, pin_memory=self.pin_memory,
                                         num_workers=self.data.cfg.data.num_workers * n,
                                         prefetch=max(1, 4 // n)))
            self.pending, self.current, self.next = next(self.steps), b, b + 1
        return self.pending.pop(task)
