"""Options of `mtssl prep`: one frozen dataclass, loaded strictly (unknown or bad values raise
ConfigError naming the `prep.<option>` key), and the fingerprint of the options that shape the
output, so shards written under other options are never mixed into a dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from mtssl.validation import require

# Where the output goes and how a run goes: left out of the manifest, which must not change
# when a dataset is resumed with other workers or copied elsewhere.
RUN_SETTINGS = ("output", "workers", "progress", "tmp_dir")
# Options that do not change a single output byte: never part of the fingerprint.
RUNTIME_ONLY = ("input",) + RUN_SETTINGS


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class PrepConfig:
    input: str = _opt("", "folder tree of images, videos and folders of numbered frames")
    output: str = _opt("", "where the dataset goes: a path, file:// or s3://bucket/prefix")
    short_side: int = _opt(256, "images are shrunk so their short side is this (never enlarged)")
    min_side: int = _opt(32, "images with a shorter short side are skipped as too small")
    jpeg_quality: int = _opt(90, "JPEG quality of the re-encoded images and frames (1-100)")
    max_pixels: int = _opt(64_000_000, "larger images are skipped as decompression bombs")
    shard_mb: float = _opt(256.0, "a shard is closed once its tar reaches this many MiB")
    shard_max_items: int = _opt(10_000, "... or once it holds this many samples")
    prior_pixels: int = _opt(4096, "pixels per colour image counted for the colorization prior")
    frames_per_video: int = _opt(16, "frames sampled, evenly spaced, per video or frame folder")
    frame_gap: int = _opt(2, "motion of frame t is measured against frames t-gap and t+gap")
    frame_short_side: int = _opt(240, "frames and their masks are stored at this short side")
    flow: Literal["dis", "farneback"] = _opt("dis", "optical flow method of the motion masks")
    frame_pattern: str = _opt(r"\d+", "a folder whose image stems all fully match this regex "
                                       "holds the frames of one video ('' = no frame folders)")
    min_folder_frames: int = _opt(8, "... and that has at least this many images")
    exclude: tuple[str, ...] = _opt((), "fnmatch patterns of relative paths to leave out, "
                                         "e.g. '*/Annotations' (repeatable)")
    workers: int = _opt(0, "processes decoding in parallel (0 = all in this process)")
    progress: bool = _opt(True, "show a progress bar")
    tmp_dir: str | None = _opt(None, "local folder where shards are assembled (default: next to "
                                     "a local output, else the system temp folder)")

    def __post_init__(self):
        require(bool(self.input), "input", "is required: the folder to prepare")
        require(bool(self.output), "output", "is required: a path, file:// or s3:// URI")
        require(self.short_side >= 16, "short_side", f"must be >= 16, got {self.short_side}")
        require(1 <= self.min_side <= self.short_side, "min_side",
                f"must be in [1, short_side={self.short_side}], got {self.min_side}")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality",
                f"must be in [1, 100], got {self.jpeg_quality}")
        require(self.max_pixels >= 1024, "max_pixels", f"must be >= 1024, got {self.max_pixels}")
        require(self.shard_mb > 0, "shard_mb", f"must be > 0, got {self.shard_mb}")
        require(self.shard_max_items >= 1, "shard_max_items",
                f"must be >= 1, got {self.shard_max_items}")
        require(self.prior_pixels >= 1, "prior_pixels", f"must be >= 1, got {self.prior_pixels}")
        require(self.frames_per_video >= 1, "frames_per_video",
                f"must be >= 1, got {self.frames_per_video}")
        require(self.frame_gap >= 1, "frame_gap", f"must be >= 1, got {self.frame_gap}")
        require(self.frame_short_side >= 32, "frame_short_side",
                f"must be >= 32, got {self.frame_short_side}")
        require(self.min_folder_frames >= 2 * self.frame_gap + 1, "min_folder_frames",
                f"must be >= 2 * frame_gap + 1 = {2 * self.frame_gap + 1}, "
                f"got {self.min_folder_frames}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        try:
            re.compile(self.frame_pattern)
        except re.error as err:
            require(False, "frame_pattern", f"is not a regular expression: {err}")

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)


def fingerprint(cfg: PrepConfig) -> str:
    """sha256 over the options that shape the output (short hex)."""
    shaping = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in RUNTIME_ONLY}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
