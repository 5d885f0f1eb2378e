"""Unsupervised motion masks from video frames (targets for the motion-segmentation task).

DIS flow to the neighbouring frames -> camera motion removed by robust global fits -> residual
speed, forward/backward minimum -> adaptive threshold -> morphology, component choice, hole
filling -> edges snapped to the frame's colour edges by a guided filter (GrabCut optional) ->
Pathak et al.'s frame filter. Thresholds, work size and
weights were chosen by measuring J on the ten DAVIS 2016 sequences in shared data
(benchmarks/davis_masks.py), so that benchmark figure is in-sample, not held out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

FLOW_METHODS = ("dis", "farneback")
CAMERA_MODELS = ("affine", "homography")


def _check_frame(frame: np.ndarray, name: str) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{name} must be an (H, W, 3) RGB array, got {getattr(frame, 'shape', type(frame))}")
    if frame.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {frame.dtype}")


DIS_PRESETS = ("ultrafast", "fast", "medium", "fine")
REFINERS = ("guided", "grabcut")


def estimate_flow(prev: np.ndarray, nxt: np.ndarray, *, method: str = "dis",
                  preset: str = "fine") -> np.ndarray:
    """Dense optical flow prev -> nxt, (H, W, 2) float32 in pixels (dx, dy).

    DIS presets are OpenCV's, plus "fine": medium's patches searched down to full resolution
    (finest scale 0 instead of 1) with a sparser grid (stride 5 instead of 3) and 16 instead of 25
    gradient-descent iterations.
    """
    import cv2

    _check_frame(prev, "prev")
    _check_frame(nxt, "nxt")
    if prev.shape != nxt.shape:
        raise ValueError(f"frame shapes differ: {prev.shape} vs {nxt.shape}")
    g0 = cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(nxt, cv2.COLOR_RGB2GRAY)
    if method == "dis":
        # Per 427x240 pair on one core (measured): medium 10 ms, fast 2.1, ultrafast 1.1; but
        # with fast the DAVIS J of the masks fell from 0.543 to 0.444 (every 10th frame). Medium
        # stops at half resolution (finest scale 1): at 427x240 that lost thin parts and edges,
        # J before refinement 0.502 against 0.541 for "fine" (about 20 ms per pair).
        if preset not in DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; expected one of {DIS_PRESETS}")
        code = "MEDIUM" if preset == "fine" else preset.upper()
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{code}"))
        if preset == "fine":
            dis.setFinestScale(0)
            dis.setPatchStride(5)
            dis.setGradientDescentIterations(16)
        flow = dis.calc(g0, g1, None)
    elif method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 4, 15, 3, 5, 1.1, 0)
    else:
        raise ValueError(f"unknown flow method {method!r}; expected one of {FLOW_METHODS}")
    return flow.astype(np.float32, copy=False)


def camera_flow(flow: np.ndarray, *, model: str = "affine", grid: int = 8,
                ransac_px: float | None = None) -> np.ndarray:
    """Flow explained by one global motion model, fitted robustly (RANSAC) to a grid of vectors."""
    import cv2

    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2), got {flow.shape}")
    h, w = flow.shape[:2]
    # A sparse grid is plenty for 6-8 parameters and keeps RANSAC cheap.
    ys, xs = np.mgrid[grid // 2:h:grid, grid // 2:w:grid]
    src = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)  # (N, 2)
    dst = src + flow[ys.ravel(), xs.ravel()]
    # Inlier tolerance scales with frame size so behaviour does not depend on work_size.
    tol = ransac_px if ransac_px is not None else max(0.5, 1.5 * max(h, w) / 640)
    if model == "affine":
        m, _ = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=tol,
                                    maxIters=2000, confidence=0.995, refineIters=10)
        mat = np.vstack([m, [0, 0, 1]]) if m is not None else None
    elif model == "homography":
        mat, _ = cv2.findHomography(src, dst, cv2.RANSAC, tol, maxIters=2000, confidence=0.995)
    else:
        raise ValueError(f"unknown camera model {model!r}; expected one of {CAMERA_MODELS}")
    if mat is None:  # degenerate fit (e.g. all-zero flow on a blank frame): assume a still camera
        return np.zeros_like(flow)
    # The model's flow at every pixel from broadcast rows and columns: no (H, W, 3) grid and
    # matrix product, which cost as much as the RANSAC fit itself.
    mat = mat.astype(np.float32)
    x, y = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    den = mat[2, 0] * x + mat[2, 1] * y + mat[2, 2]  # (H, W); 1 everywhere for affine
    out = np.empty((h, w, 2), np.float32)
    out[..., 0] = (mat[0, 0] * x + mat[0, 1] * y + mat[0, 2]) / den - x
    out[..., 1] = (mat[1, 0] * x + mat[1, 1] * y + mat[1, 2]) / den - y
    return out


def remove_camera_motion(flow: np.ndarray, *, model: str = "affine") -> np.ndarray:
    """Residual flow (H, W, 2) after subtracting the fitted global camera motion."""
    return flow - camera_flow(flow, model=model)


def _resize_long(frame: np.ndarray, long_side: int) -> np.ndarray:
    import cv2

    h, w = frame.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1.0:
        return frame
    return cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def residual_speed(frame: np.ndarray, neighbour: np.ndarray, step: int, *,
                   method: str = "dis", preset: str = "fine") -> np.ndarray:
    """Per-pixel motion not explained by the camera, in pixels per frame, (H, W) float32."""
    import cv2

    flow = estimate_flow(frame, neighbour, method=method, preset=preset)
    # A pixel counts as moving only if neither camera model explains it: homography handles
    # perspective of distant/planar scenes, affine is the steadier fit when a large object
    # tempts the 8-parameter model. On DAVIS (427 px, before GrabCut) the minimum scored mean
    # J 0.484 against 0.469 for homography and 0.453 for affine alone.
    res = np.minimum(*(cv2.magnitude(*np.moveaxis(remove_camera_motion(flow, model=m), 2, 0))
                       for m in CAMERA_MODELS))
    return (res / abs(step)).astype(np.float32)


def motion_score(frames: Sequence[np.ndarray], index: int, *, offsets: Sequence[int] = (-1, 1),
                 work_size: int = 640, method: str = "dis", preset: str = "fine") -> np.ndarray:
    """Residual speed of frames[index] at work size, combined over offsets, (h, w) float32."""
    n = len(frames)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} frames")
    index %= n
    steps = sorted({min(max(index + o, 0), n - 1) - index for o in offsets} - {0})
    if not steps:
        raise ValueError(f"no neighbour frame for index {index} with offsets {tuple(offsets)} "
                         f"in a clip of {n}")
    _check_frame(frames[index], f"frames[{index}]")
    cur = _resize_long(frames[index], work_size)
    by_dir: dict[bool, list[np.ndarray]] = {}
    for s in steps:
        nb = frames[index + s]
        _check_frame(nb, f"frames[{index + s}]")
        if nb.shape != frames[index].shape:
            raise ValueError(f"frames[{index + s}] has shape {nb.shape}, "
                             f"frames[{index}] {frames[index].shape}")
        by_dir.setdefault(s > 0, []).append(
            residual_speed(cur, _resize_long(nb, work_size), s, method=method, preset=preset))
    # Forward/backward consistency: a moving object leaves residual motion in both directions,
    # while occlusions and flow failures usually show up in one only, so take the minimum.
    per_dir = [np.mean(v, axis=0) for v in by_dir.values()]
    return np.minimum.reduce(per_dir)


def _select_components(mask: np.ndarray, score: np.ndarray, *, border: float = 0.02,
                       border_weight: float = 0.25, keep: float = 0.3) -> np.ndarray:
    """Keep components whose total score is within `keep` of the strongest one."""
    import cv2

    n, lab, _, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    weight = np.bincount(lab.ravel(), weights=score.ravel(), minlength=n)[1:]  # (n-1,)
    h, w = mask.shape
    bh, bw = max(1, int(border * h)), max(1, int(border * w))
    touching = np.unique(np.concatenate([lab[:bh].ravel(), lab[-bh:].ravel(),
                                         lab[:, :bw].ravel(), lab[:, -bw:].ravel()]))
    touching = touching[touching > 0] - 1
    # Mirrors Pathak's border rule: motion entering from the frame edge is mostly near scenery
    # whose parallax no global model removes, while filmed subjects are framed inside.
    weight[touching] *= border_weight
    chosen = np.zeros(n, bool)
    chosen[1:] = weight >= keep * weight.max()
    return chosen[lab]  # a lookup per pixel, cheaper than np.isin over the label image


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not 4-connected to the frame's edge become foreground (what
    scipy's binary_fill_holes does, one flood fill instead of iterated erosions)."""
    import cv2

    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)  # one-pixel frame of background to flood from
    outside[1:-1, 1:-1] = mask
    cv2.floodFill(outside, None, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def _grabcut_refine(mask: np.ndarray, rgb: np.ndarray, *, band: int, size: int | None = None,
                    iters: int = 3, min_ratio: float = 0.5, max_ratio: float = 3.0) -> np.ndarray:
    """Snap a blobby flow mask to colour edges; pixels beyond `band` of it stay background.

    GrabCut runs on a crop around the mask, shrunk so its long side is at most `size` pixels
    (None: as it is), for `iters` iterations; its cost grows with both.
    """
    import cv2

    area = int(mask.sum())
    if area < 20 or area > 0.9 * mask.size:  # too little to model, or no background to learn
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    near = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    # Work in a crop with a `band`-wide margin of sure background around the candidate region:
    # several times faster than the full frame, and the background colour model stays local.
    ys, xs = np.nonzero(near)
    y0, y1 = max(0, ys.min() - band), min(mask.shape[0], ys.max() + band + 1)
    x0, x1 = max(0, xs.min() - band), min(mask.shape[1], xs.max() + band + 1)
    gc = np.where(near[y0:y1, x0:x1], cv2.GC_PR_BGD, cv2.GC_BGD).astype(np.uint8)
    gc[mask[y0:y1, x0:x1]] = cv2.GC_PR_FGD
    if not (gc == cv2.GC_BGD).any():  # no background left to learn from in the crop
        return mask
    crop = np.ascontiguousarray(rgb[y0:y1, x0:x1, ::-1])
    ch, cw = gc.shape
    scale = 1.0 if size is None else min(1.0, size / max(ch, cw))
    if scale < 1.0:
        small = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        crop = cv2.resize(crop, small, interpolation=cv2.INTER_AREA)
        gc = cv2.resize(gc, small, interpolation=cv2.INTER_NEAREST)
        if not (gc == cv2.GC_BGD).any():
            return mask
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    # GrabCut draws from OpenCV's global RNG: seeding here makes a mask depend only on its
    # frames, so re-runs, resumed preps and parallel workers write the same bytes.
    cv2.setRNGSeed(0)
    cv2.grabCut(crop, gc, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.float32)
    if scale < 1.0:
        fg = cv2.resize(fg, (cw, ch), interpolation=cv2.INTER_LINEAR)
    out = np.zeros_like(mask)
    # Sure background stays background when the shrunken labels are blown back up.
    out[y0:y1, x0:x1] = (fg > 0.5) & near[y0:y1, x0:x1]
    # When object and background share colours, GrabCut can swallow or erase the object;
    # a result far from the motion evidence is distrusted and the flow mask kept.
    return out if min_ratio * area <= out.sum() <= max_ratio * area else mask


def _box(img: np.ndarray, r: int) -> np.ndarray:
    import cv2

    return cv2.boxFilter(img, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, src: np.ndarray, *, radius: int, eps: float = 1e-3) -> np.ndarray:
    """He et al.'s guided filter with a colour guide: src (H, W) smoothed so that its edges
    follow those of guide (H, W, 3) uint8; (H, W) float32. Box filters only, O(pixels)."""
    i = guide.astype(np.float32) * np.float32(1 / 255)  # (H, W, 3)
    p = src.astype(np.float32)
    # one multi-channel box filter for the means of I, p, I*p and the 6 products I_a*I_b
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    stack = np.concatenate([i, p[..., None], i * p[..., None]]
                           + [i[..., a, None] * i[..., b, None] for a, b in pairs], -1)
    m = _box(stack, radius)
    mi, mp = m[..., :3], m[..., 3]
    cov = m[..., 4:7] - mi * mp[..., None]
    var = [m[..., 7 + k] - mi[..., a] * mi[..., b] + (eps if a == b else 0) for k, (a, b) in enumerate(pairs)]
    rr, rg, rb, gg, gb, bb = var
    # (Sigma + eps I)^-1 cov per pixel, Sigma the guide's 3x3 window covariance: adjugate / det
    i_rr, i_rg, i_rb = gg * bb - gb * gb, gb * rb - rg * bb, rg * gb - gg * rb
    i_gg, i_gb, i_bb = rr * bb - rb * rb, rb * rg - rr * gb, rr * gg - rg * rg
    det = rr * i_rr + rg * i_rg + rb * i_rb
    c0, c1, c2 = cov[..., 0], cov[..., 1], cov[..., 2]
    ab = np.stack([i_rr * c0 + i_rg * c1 + i_rb * c2, i_rg * c0 + i_gg * c1 + i_gb * c2,
                   i_rb * c0 + i_gb * c1 + i_bb * c2], -1) / det[..., None]
    ab = np.concatenate([ab, (mp - (ab * mi).sum(-1))[..., None]], -1)  # (H, W, 4): a, b
    mab = _box(ab, radius)
    return (mab[..., :3] * i).sum(-1) + mab[..., 3]


def _guided_refine(mask: np.ndarray, rgb: np.ndarray, *, radius: int, eps: float) -> np.ndarray:
    """Snap a mask's edges to the frame's colour edges: guided filter of the mask, cut at 0.5.

    Computed on the mask's bounding box grown by 2 * radius + 1, which is exact: farther
    out every window of the filter sees only background, so the output there is 0.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask
    m = 2 * radius + 1
    y0, y1 = max(0, ys.min() - m), min(mask.shape[0], ys.max() + m + 1)
    x0, x1 = max(0, xs.min() - m), min(mask.shape[1], xs.max() + m + 1)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = guided_filter(rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1], radius=radius, eps=eps) > 0.5
    return out


# Names what `motion_mask`'s defaults compute; part of prep's fingerprint, so shards with masks
# of an earlier method are never mixed into (or resumed as) a dataset of this one.
MASK_METHOD = "dis-fine+guided-r10"


def motion_mask(frames: Sequence[np.ndarray], index: int, *, offsets: Sequence[int] = (-1, 1),
                work_size: int = 640, method: str = "dis", preset: str = "fine",
                rel_thresh: float = 8.0, peak_thresh: float = 0.2, abs_thresh: float = 1e-3,
                refine: str | None = "guided", refine_size: int | None = 320,
                refine_iters: int = 1, guided_radius: int = 10, guided_eps: float = 1e-3) -> np.ndarray:
    """Bool (H, W) mask of independently moving pixels in frames[index].

    Neighbours are frames[index + o] for o in offsets, clipped to the clip; flow and masks are
    computed with the long side at work_size pixels and the mask is upsampled back.
    refine: "guided" (guided filter of the mask, radius guided_radius at a 427-pixel long side,
    guided by the frame, cut at 0.5), "grabcut" (GrabCut on a crop shrunk to refine_size for
    refine_iters iterations) or None. The defaults are a measured trade (DAVIS, every 10th
    frame, frames at 427x240, one core): DIS "fine" + guided radius 10 gave J 0.564 at 13.1
    frames/s; DIS medium + GrabCut (<= 320 px, 1 iteration) J 0.545 at 11.5; finest-scale-0 flow +
    GrabCut (<= 192-320 px, 1 iteration) J 0.537-0.555 at 8-11 (README, motion-mask tables).
    """
    import cv2

    if refine is not None and refine not in REFINERS:  # before the flow, not after it
        raise ValueError(f"unknown refine {refine!r}; expected one of {REFINERS} or None")
    score = motion_score(frames, index, offsets=offsets, work_size=work_size, method=method,
                         preset=preset)  # (h, w)
    h, w = score.shape
    unit = max(h, w) / 427  # kernel sizes below were chosen at a 427-pixel long side
    # Adaptive threshold: the median is background residual (flow noise, mild parallax) as long
    # as the object covers under half the frame; the peak term drops flow that the smoothness
    # prior bleeds from a fast object onto its surroundings; the absolute floor (a fraction of the
    # long side per frame) keeps noise on a static shot from becoming "motion".
    thresh = max(abs_thresh * max(h, w), rel_thresh * float(np.median(score)),
                 peak_thresh * float(np.percentile(score, 99)))
    mask = (score > thresh).astype(np.uint8)
    ell = lambda r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))  # noqa: E731
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, ell(max(1, round(unit))))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ell(max(1, round(2 * unit))))
    mask = _fill_holes(_select_components(mask > 0, score))
    if refine is not None:
        rgb = _resize_long(frames[index % len(frames)], work_size)
        if refine == "guided":
            mask = _guided_refine(mask, rgb, radius=max(1, round(guided_radius * unit)), eps=guided_eps)
        else:
            mask = _grabcut_refine(mask, rgb, band=max(2, round(20 * unit)), size=refine_size,
                                   iters=refine_iters)
    H, W = frames[index].shape[:2]
    if (h, w) == (H, W):
        return mask
    # Linear upsampling then 0.5 cut gives smoother edges than nearest-neighbour blocks.
    return cv2.resize(mask.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR) > 0.5


def frame_filter(mask: np.ndarray, *, min_moving: float = 0.10, max_moving: float = 0.80,
                 border: float = 0.05, max_border_moving: float = 0.10) -> str | None:
    """Pathak et al.'s rule: None if the frame is kept, else why it is dropped."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {mask.shape}")
    mask = mask.astype(bool)
    moving = mask.mean()
    if moving < min_moving:
        return "too_little_motion"
    if moving > max_moving:
        return "too_much_motion"
    h, w = mask.shape
    bh, bw = max(1, int(np.ceil(border * h))), max(1, int(np.ceil(border * w)))
    band = np.ones_like(mask)
    band[bh:h - bh, bw:w - bw] = False
    if mask[band].mean() > max_border_moving:
        return "border_motion"
    return None


def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS J: intersection over union of two masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)
