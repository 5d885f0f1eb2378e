"""Options of `mtssl prep`: one frozen dataclass, loaded strictly (unknown or bad values raise
ConfigError naming the `prep.<option>` key), and the fingerprint of the options that shape the
output, so shards written under other options are never mixed into a dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mtssl.prep.motion import MASK_METHOD
from mtssl.validation import require

# Where the output goes and how a run goes: left out of the manifest, which must not change
# when a dataset is resumed with other workers or copied elsewhere.
RUN_SETTINGS = ("output", "workers", "progress", "tmp_dir", "partition")
# Options that do not change a single output byte: never part of the fingerprint.
RUNTIME_ONLY = ("input",) + RUN_SETTINGS
_PARTITION = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


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
    frames_per_video: int = _opt(16, "frames sampled, evenly spaced, per video or frame folder")
    frame_gap: int = _opt(2, "motion of frame t is measured against frames t-gap and t+gap")
    frame_short_side: int = _opt(240, "frames and their masks are stored at this short side")
    flow: Literal["dis", "farneback"] = _opt("dis", "optical flow method of the motion masks")
    frame_pattern: str = _opt(r"\d+", "a folder whose image stems all fully match this regex "
                                       "holds the frames of one video ('' = no frame folders)")
    min_folder_frames: int = _opt(8, "... and that has at least this many images")
    exclude: tuple[str, ...] = _opt((), "fnmatch patterns of relative paths to leave out, "
                                         "e.g. '*/Annotations' (repeatable)")
    workers: int | None = _opt(None, "processes preparing items in parallel (default: the "
                                     "CPUs this process may use; 1 = all in this process)")
    progress: bool = _opt(True, "show a progress bar")
    partition: str | None = _opt(None, "K/N: prepare only the K-th of N interleaved shares of "
                                       "the input (1 <= K <= N) as a shard set of its own; "
                                       "`mtssl prep-merge OUTPUT` joins the N into one dataset")
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
        require(self.frames_per_video >= 1, "frames_per_video",
                f"must be >= 1, got {self.frames_per_video}")
        require(self.frame_gap >= 1, "frame_gap", f"must be >= 1, got {self.frame_gap}")
        require(self.frame_short_side >= 32, "frame_short_side",
                f"must be >= 32, got {self.frame_short_side}")
        require(self.min_folder_frames >= 2 * self.frame_gap + 1, "min_folder_frames",
                f"must be >= 2 * frame_gap + 1 = {2 * self.frame_gap + 1}, "
                f"got {self.min_folder_frames}")
        require(self.workers is None or self.workers >= 1, "workers",
                f"must be >= 1 (1 = all in this process) or null (every usable CPU), "
                f"got {self.workers}")
        if self.partition is not None:
            match = _PARTITION.fullmatch(self.partition)
            require(match is not None and 1 <= int(match[1]) <= int(match[2]) <= 9999,
                    "partition", f"must be K/N with 1 <= K <= N <= 9999, got {self.partition!r}")
        try:
            re.compile(self.frame_pattern)
        except re.error as err:
            require(False, "frame_pattern", f"is not a regular expression: {err}")

    @property
    def part(self) -> tuple[int, int] | None:
        """(K, N) of --partition K/N, or None for the whole input."""
        if self.partition is None:
            return None
        k, n = self.partition.split("/")
        return int(k), int(n)

    @property
    def processes(self) -> int:
        """Worker processes to run: `workers`, or one per CPU this process may use."""
        return self.workers if self.workers is not None else usable_cpus()

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), which os.cpu_count() ignores and a pod would oversubscribe."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cpus or 1)
    if quota != "max":
        cpus = min(cpus or 1, math.ceil(int(quota) / int(period)))
    return max(1, cpus or 1)


def fingerprint(cfg: PrepConfig) -> str:
    """sha256 over the options that shape the output (short hex)."""
    shaping = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in RUNTIME_ONLY}
    # A retired option (the colour prior prep no longer writes), at its old default, and the
    # motion-mask method: a prep interrupted under an earlier method (before "dis-fine+guided-r10",
    # 2026-11-30) is refused on resume and merge rather than mixed with masks of this one.
    shaping["prior_pixels"] = 4096
    shaping["motion_masks"] = MASK_METHOD
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
