"""NYU depth on SYNTHETIC fixtures in the documented layout: readers, invalid pixels, the
up-projection decoder, and a fine-tune that must beat the constant-depth baseline."""

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import write_synthetic_nyu

from mtssl.config import load_config
from mtssl.eval.common import EvalError, random_trunk, suite_settings
from mtssl.eval.nyu import DepthNet, berhu, list_pairs, read_depth, run, unpool

TINY_ARCH = ["trunk.width=0.0625", "trunk.units=[1,1,2]"]


def test_depth_readers_mark_invalid_pixels(tmp_path):
    np.save(tmp_path / "a.depth.npy", np.array([[1.5, np.nan], [-1.0, 0.0]], np.float32))
    assert read_depth(tmp_path / "a.depth.npy").tolist() == [[1.5, 0.0], [0.0, 0.0]]
    Image.fromarray(np.array([[1500, 0]], np.uint16)).save(tmp_path / "b.depth.png")
    assert read_depth(tmp_path / "b.depth.png").tolist() == [[1.5, 0.0]]
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "c.depth.png")
    with pytest.raises(ValueError, match="16-bit millimetres"):
        read_depth(tmp_path / "c.depth.png")


def test_synthetic_fixtures_layout(tmp_path):
    root = write_synthetic_nyu(tmp_path, train=3, test=2, size=(24, 32))
    assert "SYNTHETIC" in (root / "SYNTHETIC").read_text()
    pairs, problems = list_pairs(root / "train", None)
    assert len(pairs) == 3 and not problems
    test_pairs, _ = list_pairs(root / "test", None)
    assert all(p[1].name.endswith(".depth.png") for p in test_pairs)
    depth = read_depth(pairs[0][1])
    assert depth.shape == (24, 32) and (depth == 0).any() and depth.max() <= 8.0


def test_missing_and_mismatched_depth(tmp_path):
    root = write_synthetic_nyu(tmp_path, train=3, test=2, size=(24, 32))
    (root / "train" / "00001.depth.npy").unlink()
    np.save(root / "train" / "00002.depth.npy", np.ones((5, 5), np.float32))
    pairs, problems = list_pairs(root / "train", None)
    assert [p[0].name for p in pairs] == ["00000.png", "00002.png"]
    assert problems == [(str(root / "train" / "00001.png"), "missing_depth")]
    s = suite_settings("nyu", "smoke", ["iterations=2", "batch_size=2", "input_size=[24,32]"])
    r = run(random_trunk(load_config("quickstart", TINY_ARCH).trunk), root, s)
    assert r["skipped"] == {"missing_depth": 1, "size_mismatch": 2}  # drawn twice
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no image with a depth map"):
        list_pairs(tmp_path / "empty", None)


def test_unpool_berhu_and_decoder_shape():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert unpool(x)[0, 0].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [2, 0, 3, 0], [0, 0, 0, 0]]
    pred, target = torch.tensor([1.0, 2.0, 6.0, 9.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    # residuals 0, 1, 5 on valid pixels; c = 1: L1 for 0 and 1, (25 + 1) / 2 for 5
    assert berhu(pred, target, target > 0).item() == pytest.approx((0 + 1 + 13) / 3)
    trunk = random_trunk(load_config("quickstart", TINY_ARCH).trunk).build(8)
    net = DepthNet(trunk, input_mode="rgb", lasso=True, channels=32, norm="batch", init_depth=3.0)
    assert len(net.up) == 2  # stride 8 -> 2
    out = net(torch.rand(2, 3, 48, 64))
    assert out.shape == (2, 1, 48, 64)
    assert net.mix.alpha is not None and net.mix.alpha.shape == (2,)


def test_fine_tune_beats_constant_depth_on_learnable_synthetic_data(tmp_path):
    root = write_synthetic_nyu(tmp_path, train=24, test=6, size=(32, 48))
    s = suite_settings("nyu", "smoke", ["iterations=40", "input_size=[32,48]"])
    r = run(random_trunk(load_config("quickstart", TINY_ARCH).trunk), root, s,
            settings_name="smoke")
    assert r["synthetic"] and "SYNTHETIC" in r["data_note"]
    m, base = r["metrics"], r["constant_baseline"]
    assert m["delta1"] > base["delta1"] + 0.2, (m, base)
    assert m["abs_rel"] < 0.7 * base["abs_rel"] and m["rmse"] < base["rmse"]
    assert m["delta1"] <= m["delta2"] <= m["delta3"] <= 1.0
