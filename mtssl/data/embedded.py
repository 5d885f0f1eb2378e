"""The quickstart's embedded data: real photos bundled inside scikit-image (no download), and
synthetic motion clips composed from them for the motion-segmentation task."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from mtssl.data.images import ArrayImages, FramesWithMasks

# colour photos first, then real grayscale photos; all are files shipped in skimage/data
EMBEDDED_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "moon", "grass", "gravel", "brick")
# Pathak et al. keep frames with 10-80% moving pixels; aim well inside 10-40%
_COVERAGE = (0.13, 0.33)
_BORDER = 0.05  # their border band: the synthetic object never enters it


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=1)
def embedded_photos() -> ArrayImages:
    """The EMBEDDED_PHOTOS as RGB uint8, named `skimage:<name>` (loaded once per process)."""
    return ArrayImages([(f"skimage:{n}", _photo(n)) for n in EMBEDDED_PHOTOS])


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def _radius(theta: np.ndarray, harmonics: np.ndarray, phases: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * theta.ndim  # harmonics along a new leading axis
    k = np.arange(2, 2 + len(harmonics)).reshape(shape)
    return 1 + (harmonics.reshape(shape) * np.cos(k * theta + phases.reshape(shape))).sum(0)


def _blob_mask(h: int, w: int, harmonics: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """(h, w) bool star-shaped blob filling its box: an ellipse whose radius is modulated by a
    few low angular harmonics, so the outline is smooth."""
    yy, xx = np.mgrid[0:h, 0:w]
    y = (yy + 0.5) / h * 2 - 1
    x = (xx + 0.5) / w * 2 - 1
    # scaled so the largest radius is 1: the blob touches its box but never leaves it
    peak = _radius(np.linspace(0, 2 * np.pi, 720), harmonics, phases).max()
    return np.hypot(x, y) <= _radius(np.arctan2(y, x), harmonics, phases) / peak


def _clip(rng: np.random.Generator, photos: ArrayImages, frames: int, size: tuple[int, int]):
    """One synthetic clip: (list of (H, W, 3) uint8 frames, list of (H, W) float32 masks)."""
    h, w = size
    bg_i, fg_i = rng.choice(len(photos), size=2, replace=False)
    # background: a crop of one photo, panned a few px per frame to mimic camera motion
    direction = rng.uniform(0, 2 * np.pi)
    step = rng.uniform(0.5, 3.0) * np.array([np.sin(direction), np.cos(direction)])
    pan = np.ceil(np.abs(step) * (frames - 1)).astype(int) + 1
    bg = photos.load(bg_i)
    zoom = rng.uniform(1.0, 1.4) * max((h + pan[0]) / bg.shape[0], (w + pan[1]) / bg.shape[1])
    bg = _resize(bg, max(h + pan[0], round(bg.shape[0] * zoom)),
                 max(w + pan[1], round(bg.shape[1] * zoom)))
    start = np.array([rng.integers(0, bg.shape[0] - h - pan[0] + 1),
                      rng.integers(0, bg.shape[1] - w - pan[1] + 1)])
    start += np.where(step < 0, pan, 0)  # leave room to pan in the drawn direction
    # foreground: a blob cut from another photo, sized for the target coverage
    harmonics, phases = rng.uniform(-0.12, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)
    fill = _blob_mask(128, 128, harmonics, phases).mean()
    area = rng.uniform(*_COVERAGE) * h * w / fill
    aspect = rng.uniform(0.7, 1.4) * h / w  # box height / width
    oh, ow = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    margin = np.ceil(_BORDER * np.array([h, w])).astype(int) + 1
    oh, ow = min(oh, h - 2 * margin[0]), min(ow, w - 2 * margin[1])
    blob = _blob_mask(oh, ow, harmonics, phases)
    fg_photo = photos.load(fg_i)
    crop = int(min(fg_photo.shape[0], fg_photo.shape[1] * oh / ow) * rng.uniform(0.5, 1.0))
    cy = rng.integers(0, fg_photo.shape[0] - crop + 1)
    cw = min(fg_photo.shape[1], int(crop * ow / oh))
    cx = rng.integers(0, fg_photo.shape[1] - cw + 1)
    fg = _resize(fg_photo[cy:cy + crop, cx:cx + cw], oh, ow)
    # trajectory: eased glide between two far-apart points plus a sideways sinusoid, kept
    # inside the frame minus the border band
    lo, hi = margin, np.array([h - oh, w - ow]) - margin
    a, ends = rng.uniform(lo, hi), rng.uniform(lo, hi, size=(8, 2))
    b = ends[np.argmax(np.linalg.norm(ends - a, axis=1))]  # the farthest: the object travels
    t = np.linspace(0, 1, frames)
    ease = t * t * (3 - 2 * t)
    normal = np.array([-(b - a)[1], (b - a)[0]]) / (np.linalg.norm(b - a) + 1e-9)
    sway = rng.uniform(0.02, 0.06) * min(h, w) * np.sin(2 * np.pi * (t + rng.uniform()))
    path = a + np.outer(ease, b - a) + np.outer(sway, normal)
    path = np.rint(np.clip(path, lo, hi)).astype(int)  # (frames, 2) top-left corners
    out_frames, out_masks = [], []
    for f in range(frames):
        y0, x0 = (start + np.rint(step * f)).astype(int)
        frame = bg[y0:y0 + h, x0:x0 + w].copy()
        mask = np.zeros((h, w), np.float32)
        py, px = path[f]
        region = frame[py:py + oh, px:px + ow]
        region[blob] = fg[blob]
        mask[py:py + oh, px:px + ow] = blob
        out_frames.append(frame)
        out_masks.append(mask)
    return out_frames, out_masks


def synthetic_motion_clips(*, num_clips: int = 6, frames_per_clip: int = 8,
                           size: tuple[int, int] = (240, 320),
                           seed: int = 0) -> tuple[FramesWithMasks, list[list[np.ndarray]]]:
    """SYNTHETIC video clips built from the embedded real photos: a panning background crop and
    a photo-textured blob moving along a smooth random path, with its exact foreground mask.

    Returns (frame/mask pairs named `synthetic/clipNN/TTT`, raw frames per clip); the object
    covers about 13-33% of each frame and never enters the 5% border band. Same seed, same
    clips."""
    if num_clips < 1 or frames_per_clip < 2:
        raise ValueError("need num_clips >= 1 and frames_per_clip >= 2")
    if min(size) < 48:
        raise ValueError(f"size {size} too small for synthetic clips (min side 48)")
    rng = np.random.default_rng(seed)
    photos = embedded_photos()
    items, clips = [], []
    for c in range(num_clips):
        frames, masks = _clip(rng, photos, frames_per_clip, tuple(size))
        clips.append(frames)
        items += [(f"synthetic/clip{c:02d}/{t:03d}", fr, m)
                  for t, (fr, m) in enumerate(zip(frames, masks))]
    return FramesWithMasks.from_arrays(items), clips
