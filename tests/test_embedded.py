import pickle
import socket

import numpy as np
import pytest

from mtssl.data.embedded import EMBEDDED_PHOTOS, embedded_photos, synthetic_motion_clips
from mtssl.data.images import ArrayImages, FramesWithMasks, is_grayscale


@pytest.fixture(scope="module")
def clips():
    return synthetic_motion_clips(num_clips=4, frames_per_clip=6, seed=0)


def test_embedded_photos_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network blocked by test: embedded photos must be bundled files")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    embedded_photos.cache_clear()
    photos = embedded_photos()
    assert isinstance(photos, ArrayImages) and len(photos) == len(EMBEDDED_PHOTOS) == 13
    assert embedded_photos() is photos  # cached
    gray = []
    for i in range(len(photos)):
        rgb = photos.load(i)
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
        assert min(rgb.shape[:2]) >= 256 and rgb.std() > 10  # real photos, not blanks
        gray.append(is_grayscale(rgb))
    assert sum(not g for g in gray) >= 8
    assert gray == sorted(gray)  # colour photos first
    assert photos.name(4) == "skimage:motorcycle_left"


def test_synthetic_clips_shapes_and_names(clips):
    fw, raw = clips
    assert isinstance(fw, FramesWithMasks) and len(fw) == 24
    assert len(raw) == 4 and all(len(c) == 6 for c in raw)
    assert fw.name(7) == "synthetic/clip01/001"
    rgb, mask = fw.load(7)
    assert rgb.shape == (240, 320, 3) and rgb.dtype == np.uint8
    assert mask.shape == (240, 320) and mask.dtype == np.float32
    np.testing.assert_array_equal(rgb, raw[1][1])


def test_synthetic_masks_pass_frame_filter(clips):
    fw, _ = clips
    band = np.zeros((240, 320), bool)
    band[:12], band[-12:], band[:, :16], band[:, -16:] = True, True, True, True
    for i in range(len(fw)):
        _, mask = fw.load(i)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert 0.10 <= mask.mean() <= 0.40
        assert mask[band].mean() <= 0.10  # Pathak et al.'s border rule
    many, _ = synthetic_motion_clips(num_clips=40, frames_per_clip=2, size=(96, 128), seed=9)
    coverage = [many.load(i)[1].mean() for i in range(0, len(many), 2)]
    assert 0.10 <= min(coverage) and max(coverage) <= 0.40


def test_synthetic_object_and_camera_move(clips):
    fw, raw = clips
    for c in range(len(raw)):
        frames = [fw.load(c * 6 + t) for t in range(6)]
        centroids = [np.argwhere(m > 0.5).mean(0) for _, m in frames]
        assert np.linalg.norm(centroids[-1] - centroids[0]) > 10  # the object travels
        diffs = [np.abs(a[0].astype(int) - b[0].astype(int)).mean()
                 for a, b in zip(frames, frames[1:])]
        assert min(diffs) > 1.0
        # background pans: frame T-1 at (y, x) equals frame 0 at (y + dy, x + dx) for one
        # non-zero integer offset, on pixels that are background in both
        (f0, m0), (f1, m1) = frames[0], frames[-1]
        ys, xs = np.mgrid[24:216:5, 24:296:5].reshape(2, -1)
        keep = m1[ys, xs] == 0
        ys, xs = ys[keep], xs[keep]
        d = np.arange(-23, 24)
        y0 = ys[None, None, :] + d[:, None, None]  # (47, 1, N)
        x0 = xs[None, None, :] + d[None, :, None]  # (1, 47, N)
        bg = m0[y0, x0] == 0  # (47, 47, N)
        err = np.abs(f0[y0, x0].astype(int) - f1[ys, xs]).sum(-1)  # (47, 47, N)
        mean_err = (err * bg).sum(-1) / np.maximum(bg.sum(-1), 1)
        iy, ix = np.unravel_index(np.argmin(mean_err), mean_err.shape)
        assert mean_err[iy, ix] == 0 and (d[iy], d[ix]) != (0, 0)


def test_synthetic_clips_deterministic_by_seed():
    a, raw_a = synthetic_motion_clips(num_clips=2, frames_per_clip=3, seed=5)
    b, raw_b = synthetic_motion_clips(num_clips=2, frames_per_clip=3, seed=5)
    c, _ = synthetic_motion_clips(num_clips=2, frames_per_clip=3, seed=6)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.load(i)[0], b.load(i)[0])
        np.testing.assert_array_equal(a.load(i)[1], b.load(i)[1])
    assert not np.array_equal(a.load(0)[0], c.load(0)[0])
    assert pickle.loads(pickle.dumps(a)).load(2)[1].sum() == a.load(2)[1].sum()


def test_synthetic_clips_other_size_and_bad_arguments():
    fw, raw = synthetic_motion_clips(num_clips=1, frames_per_clip=2, size=(96, 128), seed=1)
    assert fw.load(1)[0].shape == (96, 128, 3) and raw[0][0].shape == (96, 128, 3)
    assert 0.10 <= fw.load(0)[1].mean() <= 0.40
    with pytest.raises(ValueError):
        synthetic_motion_clips(frames_per_clip=1)
    with pytest.raises(ValueError):
        synthetic_motion_clips(size=(20, 20))
