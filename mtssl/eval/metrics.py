"""Evaluation measures as pure functions on numpy arrays (torch tensors are accepted too).

- classification: top-k accuracy;
- detection: box IoU, PASCAL VOC 2007 matching (difficult objects ignored) and 11-point AP;
- depth: delta < 1.25^k, abs-rel and RMSE over valid pixels, accumulable over a data set.
"""

from __future__ import annotations

import numpy as np

DEPTH_EPS = 1e-3  # predictions are clamped to this (metres) so depth ratios stay finite


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def topk_accuracy(logits, labels, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (<= classes)."""
    scores, labels = _np(logits), _np(labels).astype(np.int64)  # (N, K), (N,)
    if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits (N, K) and labels (N,) with N > 0, got {scores.shape} "
                         f"and {labels.shape}")
    if any(k < 1 or k > scores.shape[1] for k in ks):
        raise ValueError(f"k must be in 1..{scores.shape[1]} (the number of classes), got {ks}")
    # Rank of the true class: how many scores beat it (ties count against the prediction).
    true = scores[np.arange(len(labels)), labels][:, None]
    rank = (scores > true).sum(axis=1) + ((scores == true).sum(axis=1) - 1)  # (N,)
    return {k: float((rank < k).mean()) for k in ks}


def box_iou(a, b) -> np.ndarray:
    """IoU of boxes (N, 4) x (M, 4) given as continuous (x0, y0, x1, y1) -> (N, M)."""
    a, b = _np(a).reshape(-1, 4).astype(np.float64), _np(b).reshape(-1, 4).astype(np.float64)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def voc07_ap(recall, precision) -> float:
    """VOC 2007 11-point AP: mean over t = 0, 0.1, ..., 1 of the best precision at recall >= t."""
    recall, precision = _np(recall), _np(precision)
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0
              for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def match_detections(detections, ground_truth, iou_threshold: float = 0.5
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """VOC matching for one class.

    detections: list of (image_id, score, box (4,)); ground_truth: image_id -> (boxes (G, 4),
    difficult (G,) bool). Highest scores first, each detection takes the best-overlapping
    ground-truth box: a hit on a difficult box counts neither way, a second hit on a box is a
    false positive. Returns (tp, fp) flags in score order (ignored detections dropped) and the
    number of non-difficult ground-truth boxes.
    """
    npos = int(sum((~np.asarray(d, bool)).sum() for _, d in ground_truth.values()))
    order = sorted(range(len(detections)), key=lambda i: -float(detections[i][1]))
    taken = {img: np.zeros(len(d), bool) for img, (_, d) in ground_truth.items()}
    tp, fp = [], []
    for i in order:
        image_id, _, box = detections[i]
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            tp.append(0), fp.append(1)
            continue
        ious = box_iou(np.asarray(box)[None], boxes)[0]
        best = int(ious.argmax())
        if ious[best] < iou_threshold:
            tp.append(0), fp.append(1)
        elif difficult[best]:
            continue
        elif taken[image_id][best]:
            tp.append(0), fp.append(1)
        else:
            taken[image_id][best] = True
            tp.append(1), fp.append(0)
    return np.asarray(tp, np.int64), np.asarray(fp, np.int64), npos


def average_precision(detections, ground_truth, iou_threshold: float = 0.5) -> float:
    """VOC07 11-point AP of one class; NaN when the class has no non-difficult box."""
    tp, fp, npos = match_detections(detections, ground_truth, iou_threshold)
    if npos == 0:
        return float("nan")
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / npos
    precision = ctp / np.maximum(ctp + cfp, 1)
    return voc07_ap(recall, precision)


def detection_map(detections_by_class: dict, ground_truth_by_class: dict,
                  iou_threshold: float = 0.5) -> tuple[float, dict[str, float]]:
    """(mAP, per-class AP) over the classes of `ground_truth_by_class`; NaN classes left out."""
    per_class = {c: average_precision(detections_by_class.get(c, []), gt, iou_threshold)
                 for c, gt in ground_truth_by_class.items()}
    valid = [v for v in per_class.values() if not np.isnan(v)]
    return (float(np.mean(valid)) if valid else float("nan")), per_class


# --- depth -----------------------------------------------------------------------------------

DEPTH_SUMS = ("pixels", "delta1", "delta2", "delta3", "abs_rel", "sq_err")


def depth_sums(pred, target) -> dict[str, float]:
    """Per-set sums over the valid pixels (target finite and > 0) of one or more depth maps."""
    pred, target = _np(pred).astype(np.float64), _np(target).astype(np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    valid = np.isfinite(target) & (target > 0)
    p, t = np.clip(pred[valid], DEPTH_EPS, None), target[valid]
    ratio = np.maximum(p / t, t / p)
    return {"pixels": float(valid.sum()),
            **{f"delta{k}": float((ratio < 1.25 ** k).sum()) for k in (1, 2, 3)},
            "abs_rel": float((np.abs(p - t) / t).sum()), "sq_err": float(((p - t) ** 2).sum())}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b[k] for k in DEPTH_SUMS}


def finish_depth(sums: dict[str, float]) -> dict[str, float]:
    """delta1..3 (fractions), abs_rel and rmse (metres) from accumulated sums."""
    n = sums["pixels"]
    if n == 0:
        raise ValueError("no valid depth pixels (all targets are zero or non-finite)")
    return {"delta1": sums["delta1"] / n, "delta2": sums["delta2"] / n,
            "delta3": sums["delta3"] / n, "abs_rel": sums["abs_rel"] / n,
            "rmse": float(np.sqrt(sums["sq_err"] / n))}


def depth_metrics(pred, target) -> dict[str, float]:
    return finish_depth(depth_sums(pred, target))
