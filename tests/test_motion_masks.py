import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

pytest.importorskip("cv2")

from mtssl.prep.davis import davis_j  # noqa: E402
from mtssl.prep.motion import (  # noqa: E402
    estimate_flow,
    frame_filter,
    motion_mask,
    region_similarity,
    remove_camera_motion,
)

H, W = 160, 224
PAN = (2, 1)  # camera moves right/down by (x, y) px per frame, so the scene flows by (-2, -1)
SQ, SQ_START, SQ_VEL = 48, (60, 50), (5, -3)  # square side, (x, y) at frame 0, (vx, vy) per frame


def _texture(shape, seed):
    """Synthetic colour texture with structure at a few-pixel scale, which DIS can track."""
    rng = np.random.default_rng(seed)
    t = gaussian_filter(rng.random(shape), sigma=(1.5, 1.5, 0))
    t = (t - t.min()) / (t.max() - t.min())
    return (t * 255).astype(np.uint8)


def _synthetic_clip(n=5, with_square=True):
    """Synthetic clip: a textured square moving over a textured background that pans globally."""
    bg = _texture((H + 40, W + 40, 3), seed=0)
    sq = _texture((SQ, SQ, 3), seed=1)
    frames, boxes = [], []
    for t in range(n):
        f = bg[t * PAN[1]:t * PAN[1] + H, t * PAN[0]:t * PAN[0] + W].copy()
        x, y = SQ_START[0] + t * SQ_VEL[0], SQ_START[1] + t * SQ_VEL[1]
        if with_square:
            f[y:y + SQ, x:x + SQ] = sq
        box = np.zeros((H, W), bool)
        box[y:y + SQ, x:x + SQ] = True
        frames.append(f)
        boxes.append(box)
    return frames, boxes


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_flow_recovers_synthetic_pan(method):
    frames, _ = _synthetic_clip(2, with_square=False)
    flow = estimate_flow(frames[0], frames[1], method=method)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    inner = flow[10:-10, 10:-10].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), [-PAN[0], -PAN[1]], atol=0.2)


@pytest.mark.parametrize("model", ["affine", "homography"])
def test_remove_camera_motion_keeps_only_independent_motion(model):
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    # Global zoom + rotation + shift, i.e. an exactly affine camera flow.
    flow = np.stack([0.02 * xs - 0.01 * ys + 1.5, 0.01 * xs + 0.02 * ys - 0.5], -1)
    flow[40:80, 60:100] += (4.0, -3.0)  # an independently moving patch
    res = remove_camera_motion(flow, model=model)
    patch = np.zeros((H, W), bool)
    patch[40:80, 60:100] = True
    assert np.abs(res[~patch]).max() < 1e-2
    np.testing.assert_allclose(res[patch].mean(axis=0), [4.0, -3.0], atol=1e-2)


@pytest.mark.parametrize("refine, refine_size", [("guided", None), ("grabcut", None), ("grabcut", 40),
                                                 (None, None)])
def test_mask_finds_square_over_panning_background(refine, refine_size):
    """refine_size 40 shrinks GrabCut's crop (about 90 px here) to under half."""
    frames, boxes = _synthetic_clip()
    for i in (0, 2, 4):  # clip ends use the one neighbour that exists
        mask = motion_mask(frames, i, work_size=W, refine=refine, refine_size=refine_size)
        assert mask.shape == (H, W) and mask.dtype == bool
        assert region_similarity(mask, boxes[i]) > 0.7


def test_homography_camera_flow_is_reproduced():
    from mtssl.prep.motion import camera_flow
    hom = np.array([[1.01, 0.02, 3.0], [-0.01, 0.99, -2.0], [2e-4, -1e-4, 1.0]])
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    den = hom[2, 0] * xs + hom[2, 1] * ys + hom[2, 2]
    flow = np.stack([(hom[0, 0] * xs + hom[0, 1] * ys + hom[0, 2]) / den - xs,
                     (hom[1, 0] * xs + hom[1, 1] * ys + hom[1, 2]) / den - ys], -1)
    np.testing.assert_allclose(camera_flow(flow.astype(np.float32), model="homography"), flow,
                               atol=2e-2)


def test_hole_filling_matches_scipy():
    from scipy.ndimage import binary_fill_holes

    from mtssl.prep.motion import _fill_holes
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):  # blobs, holes in them, holes in those
        noise = gaussian_filter(rng.random((60, 80)), 1.5)
        mask = noise > np.quantile(noise, 1 - density)
        filled = _fill_holes(mask)
        assert np.array_equal(filled, binary_fill_holes(mask))
        assert filled.sum() > mask.sum()  # there were holes to fill


@pytest.mark.parametrize("preset", ["medium", "fine"])
def test_dis_presets_recover_pan(preset):
    frames, _ = _synthetic_clip(2, with_square=False)
    flow = estimate_flow(frames[0], frames[1], preset=preset)
    np.testing.assert_allclose(np.median(flow[10:-10, 10:-10].reshape(-1, 2), axis=0),
                               [-PAN[0], -PAN[1]], atol=0.2)


def test_guided_refine_snaps_to_colour_edge_and_crop_is_exact():
    """A mask 3 px too large (J 0.81) around a bright square on a dark textured background shrinks onto
    the square; filtering only the mask's grown bounding box equals filtering the whole frame."""
    from mtssl.prep.motion import _guided_refine, guided_filter
    rgb = (_texture((H, W, 3), seed=2) // 4).astype(np.uint8)
    square = _box_mask(H, W, 50, 100, 70, 130)
    rgb[square] = 230
    loose = _box_mask(H, W, 47, 103, 67, 133)
    out = _guided_refine(loose, rgb, radius=6, eps=1e-3)
    assert out.dtype == bool and out.shape == (H, W)
    assert region_similarity(out, square) > 0.9 > 0.82 > region_similarity(loose, square)
    assert np.array_equal(out, guided_filter(rgb, loose, radius=6, eps=1e-3) > 0.5)
    assert not _guided_refine(np.zeros((H, W), bool), rgb, radius=6, eps=1e-3).any()


def test_pan_alone_yields_almost_no_motion():
    frames, _ = _synthetic_clip(with_square=False)
    assert motion_mask(frames, 2, work_size=W).mean() < 0.01


def test_mask_upsamples_from_work_size():
    frames, boxes = _synthetic_clip()
    # DIS "fine" (the default; stride-5 patch grid) is too sparse for this 112x80 synthetic
    # frame: J 0.575 against 0.84 with medium; this test is about the upsampling path
    mask = motion_mask(frames, 2, work_size=W // 2, preset="medium")
    assert mask.shape == (H, W)
    assert region_similarity(mask, boxes[2]) > 0.6


def test_bad_input_is_rejected():
    frames, _ = _synthetic_clip(2)
    with pytest.raises(ValueError, match="RGB"):
        estimate_flow(frames[0][..., 0], frames[1][..., 0])
    with pytest.raises(ValueError, match="no neighbour"):
        motion_mask(frames[:1], 0)
    with pytest.raises(ValueError, match="unknown flow method"):
        estimate_flow(frames[0], frames[1], method="lucas-kanade")
    with pytest.raises(ValueError, match="unknown DIS preset"):
        estimate_flow(frames[0], frames[1], preset="slow")
    with pytest.raises(ValueError, match="unknown refine"):
        motion_mask(frames, 0, refine="crf")
    with pytest.raises(ValueError, match="unknown camera model"):
        remove_camera_motion(np.zeros((8, 8, 2), np.float32), model="projective")


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_frame_filter_reasons():
    h, w = 100, 100  # border band = 5 px on each side
    assert frame_filter(_box_mask(h, w, 40, 47, 40, 50)) == "too_little_motion"  # 7 %
    assert frame_filter(_box_mask(h, w, 0, 95, 0, 95)) == "too_much_motion"  # 90.25 %
    assert frame_filter(_box_mask(h, w, 25, 75, 25, 75)) is None  # 25 %, clear of the border
    # 30 % moving, touching the left edge: 5 x 60 = 300 of the 1900 band pixels (15.8 %).
    assert frame_filter(_box_mask(h, w, 20, 80, 0, 50)) == "border_motion"
    # Same blob, 3 px from the edge: 2 x 60 = 120 band pixels (6.3 %), kept.
    assert frame_filter(_box_mask(h, w, 20, 80, 3, 53)) is None
    assert frame_filter(_box_mask(h, w, 25, 75, 25, 75), max_moving=0.2) == "too_much_motion"
    with pytest.raises(ValueError):
        frame_filter(np.zeros(10, bool))


def test_region_similarity_known_values():
    a = _box_mask(10, 10, 0, 4, 0, 5)  # 20 px
    b = _box_mask(10, 10, 2, 6, 0, 5)  # 20 px, overlap 10 -> union 30
    assert region_similarity(a, b) == pytest.approx(1 / 3)
    assert region_similarity(a, a) == 1.0
    assert region_similarity(a, np.zeros_like(a)) == 0.0
    assert region_similarity(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        region_similarity(a, np.zeros((5, 5), bool))


def test_davis_masks_beat_trivial_baselines(davis):
    # at the size prep stores frames (short side 240, never enlarged), with motion_mask's defaults
    r = davis_j(davis.root, sequences=list(davis.lengths), frame_step=10, short_side=240)
    h, w = davis.shape
    scale = min(1.0, 240 / min(h, w))
    assert r["mask_size"] == (round(w * scale), round(h * scale)) and r["cpu_seconds"] > 0
    for name, s in r["per_sequence"].items():
        # Measured (frame_step 10): camel J 0.74 vs all-fg 0.13, dog J 0.72 vs all-fg 0.10;
        # all-background scores 0 on frames where the object is present.
        assert s["J"] > 0.55, name
        assert s["J"] - max(s["J_all_fg"], s["J_all_bg"]) > 0.4, name
    assert 0.0 <= r["kept_fraction"] <= 1.0
    assert r["frames"] == sum(-(-n // 10) for n in davis.lengths.values())  # first of every 10


def test_davis_j_skips_and_counts_corrupt_files(tmp_path):
    """A synthetic clip in the DAVIS layout, with one corrupt frame and one missing mask."""
    from PIL import Image

    frames, boxes = _synthetic_clip()
    img_dir = tmp_path / "JPEGImages" / "480p" / "synthetic"
    ann_dir = tmp_path / "Annotations" / "480p" / "synthetic"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for t, (f, b) in enumerate(zip(frames, boxes)):
        Image.fromarray(f).save(img_dir / f"{t:05d}.jpg", quality=98)
        if t != 3:
            Image.fromarray(b.astype(np.uint8) * 255).save(ann_dir / f"{t:05d}.png")
    (img_dir / "00005.jpg").write_bytes(b"not a jpeg")
    r = davis_j(tmp_path, work_size=W)
    assert r["skipped_files"] == 2  # the corrupt frame and the missing mask
    assert r["frames"] == 4  # frames 0, 1, 2, 4 are scored
    s = r["per_sequence"]["synthetic"]
    assert s["J"] > 0.7 and s["J_all_bg"] == 0.0
    assert s["J_all_fg"] == pytest.approx(SQ * SQ / (H * W))
    with pytest.raises(FileNotFoundError, match="no DAVIS sequence"):
        davis_j(tmp_path, sequences=["absent"])
