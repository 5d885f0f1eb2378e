"""The data sources named in the config: a folder, or the embedded default."""

from __future__ import annotations

import torch

from mtssl.config import Config, DataConfig
from mtssl.data.stream import TaskStream


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
        split "holdout" draws only the items training never sees (data.holdout_every)."""
        from mtssl.tasks import TASKS
        tdef, tcfg = TASKS[task], getattr(self.cfg.tasks, task)
        sampler = tdef.build_sampler(tcfg, self.trunk, getattr(self.cfg.harmonization, task))
        return TaskStream(source=self.source(tdef.source), sampler=sampler,
                          batch_size=batch_size or tcfg.batch_size, seed=self.cfg.seed,
                          stream_id=tdef.task_id + stream_offset,
                          start_batch=start_batch, stop_batch=stop_batch, shard=shard,
                          cache_items=self.cfg.data.image_cache,
                          holdout=(self.cfg.data.holdout_every, split))
