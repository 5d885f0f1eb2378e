"""Evaluation measures on hand-built cases with hand-computed answers."""

import math

import numpy as np
import pytest
import torch

from mtssl.eval.metrics import (
    add_sums,
    average_precision,
    box_iou,
    depth_metrics,
    depth_sums,
    detection_map,
    finish_depth,
    match_detections,
    topk_accuracy,
    voc07_ap,
)


def test_topk_accuracy_hand_built():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # label 3 ranks first
                           [0.3, 0.9, 0.8, 0.1, 0.0, 0.2],   # label 0 ranks third
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])  # label 5 ranks last
    acc = topk_accuracy(logits, torch.tensor([3, 0, 5]), ks=(1, 3, 5))
    assert acc == pytest.approx({1: 1 / 3, 3: 2 / 3, 5: 2 / 3})
    # ties count against the prediction: a constant score is never a hit at k=1
    assert topk_accuracy(np.ones((1, 3)), np.array([0]), ks=(1, 3)) == {1: 0.0, 3: 1.0}
    with pytest.raises(ValueError, match="k must be in 1..3"):
        topk_accuracy(np.ones((1, 3)), np.array([0]), ks=(5,))


def test_box_iou():
    iou = box_iou([[0, 0, 10, 10]], [[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert iou == pytest.approx(np.array([[25 / 175, 0.0, 1.0]]))


def toy_detection_set():
    gts = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, False])),
           1: (np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([False, True]))}
    dets = [(0, 0.9, [0, 0, 10, 10]),        # TP
            (1, 0.8, [50, 50, 60, 60]),      # hits a difficult box: ignored
            (0, 0.7, [0, 0, 10, 10]),        # duplicate: FP
            (1, 0.6, [100, 100, 110, 110]),  # nothing there: FP
            (1, 0.5, [0, 0, 10, 11]),        # IoU 100/110: TP
            (0, 0.4, [20, 20, 30, 40])]      # IoU exactly 0.5: TP
    return dets, gts


def test_voc_matching_and_11_point_ap_match_hand_computation():
    dets, gts = toy_detection_set()
    tp, fp, npos = match_detections(dets[::-1], gts)  # input order must not matter
    assert npos == 3 and tp.tolist() == [1, 0, 0, 1, 1] and fp.tolist() == [0, 1, 1, 0, 0]
    # recall 1/3,1/3,1/3,2/3,1 ; precision 1,1/2,1/3,1/2,3/5
    # t = 0..0.3 -> 1 (4 points); t = 0.4..1.0 -> 0.6 (7 points)
    assert average_precision(dets, gts) == pytest.approx((4 * 1 + 7 * 0.6) / 11)
    assert voc07_ap(np.array([0.5]), np.array([1.0])) == pytest.approx(6 / 11)


def test_detection_map_leaves_out_classes_without_boxes():
    dets, gts = toy_detection_set()
    mean_ap, per_class = detection_map({"a": dets, "b": [(0, 0.9, [0, 0, 1, 1])]},
                                       {"a": gts, "b": {}})
    assert math.isnan(per_class["b"]) and mean_ap == pytest.approx(per_class["a"])


def test_depth_metrics_mask_invalid_pixels():
    target = np.array([[1.0, 2.0], [0.0, 4.0]])
    pred = np.array([[1.2, 1.5], [5.0, 4.0]])  # the 5.0 sits on an invalid (zero) pixel
    m = depth_metrics(pred, target)
    # valid ratios 1.2, 4/3, 1.0
    assert m["delta1"] == pytest.approx(2 / 3) and m["delta2"] == 1.0 and m["delta3"] == 1.0
    assert m["abs_rel"] == pytest.approx((0.2 + 0.25 + 0.0) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0.04 + 0.25) / 3))
    nan_target = target.copy()
    nan_target[0, 0] = np.nan
    assert depth_metrics(pred, nan_target)["abs_rel"] == pytest.approx(0.25 / 2)
    # sums over parts add up to the whole
    halves = add_sums(depth_sums(pred[:1], target[:1]), depth_sums(pred[1:], target[1:]))
    assert finish_depth(halves) == pytest.approx(m)
    with pytest.raises(ValueError, match="no valid depth pixels"):
        depth_metrics(pred, np.zeros((2, 2)))
