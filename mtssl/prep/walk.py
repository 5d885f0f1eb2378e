"""Input discovery for `mtssl prep`: a streaming walk of a folder tree in a fixed order.

Items come out in order of their relative path (each folder's entries sorted by name, folders
entered where they sort), so a re-run sees the same sequence and the walk holds one folder's
listing at a time, whatever the size of the tree. Names that are not valid UTF-8 cannot be
stored in shards, manifests or logs as they are: they are skipped with the reason
'undecodable_name' (shown with backslash escapes). A frame folder with missing frame numbers is
split into its runs of consecutive frames, so motion is never computed across a gap.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mtssl.data.images import IMAGE_EXTENSIONS, os_error_reason

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".avi", ".webm", ".mov", ".mkv"})
_DIGITS = re.compile(r"\d+")
log = logging.getLogger("mtssl.prep")


def printable(name: str) -> str:
    """A file-system name as valid text: undecodable bytes as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Item:
    kind: str  # 'image', 'video' or 'frames' (a folder of numbered frames)
    rel: str  # posix path relative to the input root
    path: Path
    size: int  # bytes; a frame folder: all its frames
    frames: tuple[str, ...] = ()  # frame folder: file names in frame order

    @property
    def stream(self) -> str:
        return "images" if self.kind == "image" else "frames"


@dataclass
class WalkReport:
    """What the walk could not use: (relative path, reason) and ignored files by extension."""
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: collections.Counter = field(default_factory=collections.Counter)


def _frame_order(name: str) -> tuple[int, str]:
    runs = _DIGITS.findall(Path(name).stem)
    return (int(runs[-1]) if runs else -1, name)


class _Listing:
    """One folder's usable entries, sorted by name."""

    def __init__(self, folder: Path, rel: str, report: WalkReport, exclude: tuple[str, ...]):
        self.entries: list[tuple[str, bool, int]] = []  # (name, is_dir, size)
        try:
            with os.scandir(folder) as it:
                raw = sorted(it, key=lambda e: e.name)
        except OSError as err:
            report.problems.append((rel or ".", os_error_reason(err), f"cannot list folder: {err}"))
            return
        for e in raw:
            child = f"{rel}/{e.name}" if rel else e.name
            if printable(e.name) != e.name:  # os.scandir decoded invalid UTF-8 as surrogates
                report.problems.append((printable(child), "undecodable_name",
                                        "file name is not valid UTF-8; rename it to include it"))
                continue
            if any(fnmatch.fnmatch(child, p) for p in exclude):
                continue
            try:
                if e.is_dir():
                    self.entries.append((e.name, True, 0))
                elif e.is_file():
                    self.entries.append((e.name, False, e.stat().st_size))
                elif e.is_symlink():
                    report.problems.append((child, "broken_link", "symbolic link to nothing"))
            except OSError as err:
                report.problems.append((child, os_error_reason(err), str(err)))


def frame_runs(rel: str, folder: Path, sizes: dict[str, int]) -> Iterator[Item]:
    """One frame-folder Item per run of consecutive frame numbers (all of it without gaps)."""
    names = sorted(sizes, key=_frame_order)
    numbers = [_frame_order(n)[0] for n in names]
    cuts = [i for i in range(1, len(names)) if numbers[i] > numbers[i - 1] + 1]
    if not cuts or min(numbers) < 0:
        yield Item("frames", rel, folder, sum(sizes.values()), tuple(names))
        return
    log.warning("%s: frame numbers jump at %s; split into %d sequences", printable(rel),
                ", ".join(f"{numbers[i - 1]}->{numbers[i]}" for i in cuts), len(cuts) + 1)
    bounds = [0, *cuts, len(names)]
    for lo, hi in zip(bounds, bounds[1:]):
        run = names[lo:hi]
        yield Item("frames", f"{rel}#{numbers[lo]}-{numbers[hi - 1]}", folder,
                   sum(sizes[n] for n in run), tuple(run))


def walk(root: str | os.PathLike, *, exclude: tuple[str, ...] = (), frame_pattern: str = r"\d+",
         min_folder_frames: int = 8, report: WalkReport | None = None) -> Iterator[Item]:
    """Image files, video files and frame folders under `root`, in relative-path order.

    A folder is a frame folder when it holds at least `min_folder_frames` images and every
    image's stem fully matches `frame_pattern` (empty pattern: no frame folders); its images
    are then frames of one video, not separate images. Symlinked folders are followed once."""
    root = Path(root)
    report = report if report is not None else WalkReport()
    pattern = re.compile(frame_pattern) if frame_pattern else None
    seen: set[tuple[int, int]] = set()

    def enter(folder: Path, rel: str) -> Iterator[Item]:
        try:
            st = folder.stat()
        except OSError as err:
            report.problems.append((rel or ".", os_error_reason(err), str(err)))
            return
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        listing = _Listing(folder, rel, report, exclude)
        files = [(n, s) for n, d, s in listing.entries if not d]
        images = [(n, s) for n, s in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        is_frames = (pattern is not None and len(images) >= min_folder_frames
                     and all(pattern.fullmatch(Path(n).stem) for n, _ in images))
        if is_frames:
            yield from frame_runs(rel or ".", folder, dict(images))
        for name, is_dir, size in listing.entries:
            child = f"{rel}/{name}" if rel else name
            if is_dir:
                yield from enter(folder / name, child)
                continue
            ext = Path(name).suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                if not is_frames:
                    yield Item("image", child, folder / name, size)
            elif ext in VIDEO_EXTENSIONS:
                yield Item("video", child, folder / name, size)
            else:
                report.ignored[ext or "(no extension)"] += 1

    if not root.is_dir():
        raise NotADirectoryError(f"input folder not found or not a directory: {root}")
    yield from enter(root, "")
