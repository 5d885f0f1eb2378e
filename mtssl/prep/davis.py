"""Quality and cost of motion masks against DAVIS 2016 ground truth (benchmarks/davis_masks.py,
tests/test_motion_masks.py).

J (region similarity, the DAVIS measure) is averaged over frames per sequence, then over
sequences. Cost is CPU seconds of this process (time.process_time), so frames per CPU-second
are frames/s on one core whatever else the machine runs, as long as OpenCV and numpy use one
thread (the benchmark sets that); wall seconds are reported beside them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mtssl.prep.motion import frame_filter, motion_mask, region_similarity


def _load_clip(seq_dir: Path, ann_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray | None], int]:
    """Frames and masks (None where missing) of one sequence; unreadable frames are skipped."""
    from PIL import Image

    frames, gts, skipped = [], [], 0
    for path in sorted(seq_dir.glob("*.jpg")):
        try:
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError:
            skipped += 1
            continue
        try:
            with Image.open(ann_dir / f"{path.stem}.png") as im:
                gts.append(np.asarray(im.convert("L")) > 127)
        except OSError:
            gts.append(None)
            skipped += 1
    return frames, gts, skipped


def _shrink(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    import cv2

    h, w = frame.shape[:2]
    if short_side is None or min(h, w) <= short_side:
        return frame
    s = short_side / min(h, w)
    return cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    if mask.shape == shape:
        return mask
    return cv2.resize(mask.astype(np.float32), shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5


def davis_j(root, *, sequences: Sequence[str] | None = None, frame_step: int = 1,
            short_side: int | None = None, **mask_kwargs) -> dict:
    """Region similarity J and cost of motion_mask against DAVIS 2016 ground truth.

    short_side: frames are first shrunk to this short side (what `mtssl prep` stores and
    computes masks at), the shrinking counted in the cost, and masks are scaled back up to the
    ground truth's size for J. Every frame_step-th frame is scored, first and last included.
    All-foreground and all-background masks are scored on the same frames as trivial baselines.
    """
    root = Path(root)
    img_root, ann_root = root / "JPEGImages" / "480p", root / "Annotations" / "480p"
    if not img_root.is_dir():
        raise FileNotFoundError(f"no DAVIS frames under {img_root}")
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    names = sorted(p.name for p in img_root.iterdir() if p.is_dir()) if sequences is None else list(sequences)
    per_seq, skipped, n_frames, n_kept = {}, 0, 0, 0
    cpu = wall = 0.0
    size = None
    for name in names:
        if not (img_root / name).is_dir():
            raise FileNotFoundError(f"no DAVIS sequence {name!r} under {img_root}")
        frames, gts, bad = _load_clip(img_root / name, ann_root / name)
        skipped += bad
        c0, w0 = time.process_time(), time.perf_counter()
        # Every frame is a neighbour of a scored one at frame_step 1; shrinking them all once is
        # what prep does per stored frame.
        work = [_shrink(f, short_side) for f in frames]
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        rows = []  # (J, J_fg, J_bg, kept)
        for i in range(0, len(frames), frame_step):
            if gts[i] is None:  # already counted as skipped when loading
                continue
            if gts[i].shape != frames[i].shape[:2]:
                skipped += 1
                continue
            c0, w0 = time.process_time(), time.perf_counter()
            small = motion_mask(work, i, **mask_kwargs)
            cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
            size = small.shape[::-1]
            mask = _upsample(small, gts[i].shape)
            rows.append((region_similarity(mask, gts[i]), region_similarity(np.ones_like(mask), gts[i]),
                         region_similarity(np.zeros_like(mask), gts[i]), frame_filter(small) is None))
        if not rows:
            continue
        j, j_fg, j_bg, kept = (np.array(c) for c in zip(*rows))
        per_seq[name] = {"J": float(j.mean()), "J_all_fg": float(j_fg.mean()), "J_all_bg": float(j_bg.mean()),
                         "frames": len(rows), "kept_fraction": float(kept.mean()),
                         "J_kept": float(j[kept].mean()) if kept.any() else None}
        n_frames += len(rows)
        n_kept += int(kept.sum())
    if not per_seq:
        raise ValueError(f"no scorable frames under {root} for sequences {names}")
    mean = lambda key: float(np.mean([s[key] for s in per_seq.values() if s[key] is not None]))  # noqa: E731
    return {"per_sequence": per_seq, "J_mean": mean("J"), "J_all_fg_mean": mean("J_all_fg"),
            "J_all_bg_mean": mean("J_all_bg"),
            "J_kept_mean": mean("J_kept") if n_kept else None, "kept_fraction": n_kept / n_frames,
            "frames": n_frames, "cpu_seconds": cpu, "wall_seconds": wall,
            "frames_per_cpu_s": n_frames / cpu, "frames_per_s": n_frames / wall,
            "mask_size": size, "skipped_files": skipped}
