import io
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mtssl.data.images import (
    IMAGE_EXTENSIONS,
    ArrayImages,
    BadImage,
    FolderImages,
    FramesWithMasks,
    is_grayscale,
    list_images,
    load_mask,
    load_rgb,
)


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _reason(source, **kw) -> str:
    with pytest.raises(BadImage) as info:
        load_rgb(source, **kw)
    return info.value.reason


def _png_header_only(path, w: int, h: int):
    """A tiny PNG whose header claims w x h 8-bit gray pixels (the data is missing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _noise(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- bad files

def test_empty_file_and_empty_bytes(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    assert _reason(tmp_path / "e.jpg") == "empty_file"
    assert _reason(b"") == "empty_file"


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("this is not a picture\n" * 20)
    assert _reason(tmp_path / "t.jpg") == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_truncated_files(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_noise()).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    assert info.value.reason == "truncated"
    assert "cut." in str(info.value)  # the message names the file


def test_decompression_bomb_checked_from_header(tmp_path):
    # 80 Mpx: above our default limit, below Pillow's own; the data is absent, so a decode
    # attempt would have reported `truncated` instead
    assert _reason(_png_header_only(tmp_path / "bomb.png", 10_000, 8_000)) \
        == "decompression_bomb"
    # 400 Mpx trips Pillow's own guard on open; it must come out as the same reason, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _reason(_png_header_only(tmp_path / "huge.png", 20_000, 20_000)) \
            == "decompression_bomb"
    ok = _save(Image.fromarray(_noise()), tmp_path / "ok.png")
    assert load_rgb(ok).shape == (48, 64, 3)
    assert _reason(ok, max_pixels=48 * 64 - 1) == "decompression_bomb"


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path / "nope.png") == "missing"
    assert _reason(tmp_path) in ("unreadable", "permission_denied")


def test_bad_image_pickles_and_names_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(BadImage) as info:
        load_rgb(tmp_path / "x.png", name="set/x.png")
    err = pickle.loads(pickle.dumps(info.value))
    assert (err.reason, err.name) == ("not_an_image", "set/x.png")
    assert "set/x.png" in str(err) and "not_an_image" in str(err)


# ---------------------------------------------------------------- mode conversion

def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (16, 0, 32, 16))  # right half pure cyan
    rgb = load_rgb(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert rgb.shape == (16, 32, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[4:12, 2:12].astype(int) - 255).max() <= 6
    assert np.abs(rgb[4:12, 20:30].astype(int) - [0, 255, 255]).max() <= 6


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    a = np.array([[0, 32896, 65535, 1000]], np.uint16)  # 32896 = 128 * 257
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I;16")
    rgb = load_rgb(path)
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255, 4])
    assert (rgb == rgb[..., :1]).all()


def test_16bit_pgm_and_float_tiff(tmp_path):
    # PGM with maxval 4095: Pillow spreads it over 0..65535 (mode I); full scale stays 255
    (tmp_path / "a.pgm").write_bytes(
        b"P5\n3 1\n4095\n" + np.array([0, 4095, 2048], ">u2").tobytes())
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.pgm")[0, :, 1], [0, 255, 128])
    f = np.array([[0.0, 0.5, 1.0]], np.float32)
    path = _save(Image.fromarray(f), tmp_path / "f.tif")
    np.testing.assert_array_equal(load_rgb(path)[0, :, 2], [0, 128, 255])
    wide = np.array([[0, 100_000, 200_000]], np.int32)  # beyond 16 bit: min..max
    path = _save(Image.fromarray(wide), tmp_path / "i.tif")
    np.testing.assert_array_equal(load_rgb(path)[0, :, 0], [0, 128, 255])


def test_palette_with_transparency_goes_white(tmp_path):
    p = Image.new("P", (4, 2), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (2, 0, 4, 2))
    rgb = load_rgb(_save(p, tmp_path / "p.png", transparency=0))
    np.testing.assert_array_equal(rgb[:, :2], 255)  # transparent black -> white
    np.testing.assert_array_equal(rgb[:, 2:], np.broadcast_to([255, 0, 0], (2, 2, 3)))
    opaque = load_rgb(_save(p, tmp_path / "p2.png"))  # same palette, no transparency
    np.testing.assert_array_equal(opaque[:, :2], 0)


def test_rgba_composited_over_white(tmp_path):
    a = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128], [0, 0, 200, 255]]], np.uint8)
    rgb = load_rgb(_save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"))
    np.testing.assert_array_equal(
        rgb[0], [[255, 255, 255], [255, 0, 0], [127, 127, 127], [0, 0, 200]])


def test_la_and_one_bit_and_gif(tmp_path):
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), "LA")
    np.testing.assert_array_equal(load_rgb(_save(la, tmp_path / "la.png"))[0],
                                  [[100] * 3, [255] * 3])
    bits = Image.fromarray(np.array([[True, False]]))
    np.testing.assert_array_equal(load_rgb(_save(bits, tmp_path / "b.png"))[0],
                                  [[255] * 3, [0] * 3])
    rgb = load_rgb(_save(Image.fromarray(np.array([[10, 200]], np.uint8)), tmp_path / "g.gif"))
    np.testing.assert_array_equal(rgb[0], [[10] * 3, [200] * 3])


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff", ".ppm", ".webp"])
def test_lossless_rgb_round_trip(tmp_path, suffix):
    a = _noise(seed=3)
    kw = {"lossless": True} if suffix == ".webp" else {}
    out = load_rgb(_save(Image.fromarray(a), tmp_path / f"x{suffix}", **kw))
    np.testing.assert_array_equal(out, a)
    assert out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(load_rgb((tmp_path / f"x{suffix}").read_bytes()), a)


@pytest.mark.parametrize("orientation,top_left_red,shape", [
    (1, True, (10, 20, 3)),   # as stored: left half red
    (3, False, (10, 20, 3)),  # rotated 180: red moves right
    (6, True, (20, 10, 3)),   # rotate 90 clockwise: the left half becomes the top
    (8, False, (20, 10, 3)),  # rotate 90 counter-clockwise: the left half becomes the bottom
])
def test_exif_orientation(tmp_path, orientation, top_left_red, shape):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = [255, 0, 0]
    a[:, 10:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = orientation
    rgb = load_rgb(_save(Image.fromarray(a), tmp_path / "o.jpg", exif=exif, quality=95))
    assert rgb.shape == shape
    corner = rgb[1:4, 1:4].reshape(-1, 3).mean(0)
    assert (corner[0] > 200 and corner[2] < 60) == top_left_red
    assert (corner[2] > 200 and corner[0] < 60) == (not top_left_red)


def test_load_mask_modes(tmp_path):
    labels = np.array([[0, 1], [1, 0]], np.uint8)  # a 0/1 label image is binary
    m = load_mask(_save(Image.fromarray(labels), tmp_path / "l.png"))
    assert m.dtype == np.float32
    np.testing.assert_array_equal(m, labels)
    soft = np.array([[0, 255], [51, 0]], np.uint8)
    np.testing.assert_allclose(load_mask(_save(Image.fromarray(soft), tmp_path / "s.png")),
                               [[0, 1], [0.2, 0]], atol=1e-6)
    p = Image.fromarray(np.array([[0, 2], [3, 0]], np.uint8), "P")  # DAVIS-2017 object ids
    p.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
    np.testing.assert_array_equal(load_mask(_save(p, tmp_path / "p.png")), [[0, 1], [1, 0]])


# ---------------------------------------------------------------- grayscale test

def test_is_grayscale():
    g = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    rgb = np.repeat(g[..., None], 3, axis=2)
    assert is_grayscale(rgb)
    jittered = rgb.astype(int)
    jittered[..., 1] = np.clip(jittered[..., 1] + 3, 0, 255)
    assert is_grayscale(jittered.astype(np.uint8), tol=3)
    assert not is_grayscale(jittered.astype(np.uint8), tol=2)
    rgb[7, 9] = [10, 200, 10]  # one coloured pixel makes it colour
    assert not is_grayscale(rgb)
    big = np.zeros((2000, 2000, 3), np.uint8)
    big[:, :, 0] = 255  # a red image
    assert not is_grayscale(big)


# ---------------------------------------------------------------- listing

def _tree(tmp_path):
    for rel in ["b/z.PNG", "b/a.jpg", "a/deep/x.JpEg", "a/y.webp", "top.gif"]:
        _save(Image.new("RGB", (4, 3), (9, 9, 9)), tmp_path / rel,
              format={"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP",
                      "gif": "GIF"}[rel.rsplit(".", 1)[1].lower()])
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "archive.jpg.zip").write_bytes(b"PK")
    return ["a/deep/x.JpEg", "a/y.webp", "b/a.jpg", "b/z.PNG", "top.gif"]


def test_list_images_sorted_case_insensitive_and_loop_safe(tmp_path):
    expected = _tree(tmp_path)
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a loop back to the root
    os.symlink(tmp_path / "missing.png", tmp_path / "dead.png")
    paths, problems = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == expected
    assert problems == [(str(tmp_path / "dead.png"), "broken_link")]
    assert list_images(tmp_path)[0] == paths  # deterministic
    assert ".tiff" in IMAGE_EXTENSIONS and ".txt" not in IMAGE_EXTENSIONS


def test_list_images_reports_unreadable_folder_simulated(tmp_path, monkeypatch):
    expected = _tree(tmp_path)
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == str(tmp_path / "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths, problems = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == \
        [e for e in expected if not e.startswith("b/")]
    assert problems == [(str(tmp_path / "b"), "permission_denied")]


def test_list_images_reports_unreadable_folder_chmod(tmp_path):
    _tree(tmp_path)
    locked = tmp_path / "b"
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
            pytest.skip("running with privileges that ignore chmod 000 (e.g. root); the "
                        "simulated test covers this path")
        except PermissionError:
            pass
        paths, problems = list_images(tmp_path)
        assert problems == [(str(locked), "permission_denied")]
        assert len(paths) == 3
    finally:
        locked.chmod(0o755)


def test_list_images_rejects_missing_root(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        list_images(tmp_path / "nope")


# ---------------------------------------------------------------- sources

def test_folder_images(tmp_path):
    _tree(tmp_path)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = FolderImages(tmp_path)
    fresh = pickle.dumps(src)
    assert len(src) == 6 and src.name(0) == "a/deep/x.JpEg" and src.unreadable == []
    assert src.load(0).shape == (3, 4, 3)
    with pytest.raises(BadImage) as info:
        src.load(3)  # a/deep/x, a/y, b/a, then b/broken
    assert info.value.name == "b/broken.png"
    with pytest.raises(IndexError):
        src.load(6)
    for i in (0, 1, 2, 4):
        src.load(i)
    blob = pickle.dumps(src)
    assert len(blob) == len(fresh) < 1000  # paths, not pixels
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy.load(4), src.load(4))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        FolderImages(empty)


def test_array_images_convert_on_construction():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgba = np.zeros((3, 4, 4), np.uint8)
    src = ArrayImages([("g", gray), ("a", rgba), ("w", np.full((2, 2), 65535, np.uint16)),
                       ("f", np.full((2, 2, 3), 0.5)), ("b", np.ones((2, 2), bool))])
    np.testing.assert_array_equal(src.load(0)[..., 2], gray)
    np.testing.assert_array_equal(src.load(1), 255)  # fully transparent -> white
    np.testing.assert_array_equal(src.load(2), 255)
    np.testing.assert_array_equal(src.load(3), 128)
    np.testing.assert_array_equal(src.load(4), 255)
    assert all(src.load(i).dtype == np.uint8 and src.load(i).ndim == 3 for i in range(5))
    gray[:] = 99  # the source holds its own copy
    assert src.load(0)[0, 0, 0] == 0
    assert pickle.loads(pickle.dumps(src)).name(3) == "f"
    with pytest.raises(ValueError, match="shape"):
        ArrayImages([("bad", np.zeros((2, 2, 2), np.uint8))])
    with pytest.raises(ValueError, match="duplicate"):
        ArrayImages([("x", gray), ("x", gray)])
    with pytest.raises(ValueError, match=r"\[0, 1.0\]"):
        ArrayImages([("f", np.full((2, 2), 3.0))])


# ---------------------------------------------------------------- frames with masks

def _frame(path, h=12, w=16, value=50):
    return _save(Image.new("RGB", (w, h), (value, value, value)), path)


def _mask(path, h=12, w=16):
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = 255
    return _save(Image.fromarray(m), path)


def test_frames_with_masks_davis_layout(tmp_path):
    for seq in ("s1", "s2"):
        for n in range(3):
            _frame(tmp_path / f"JPEGImages/480p/{seq}/{n:05d}.jpg")
    for n in range(3):
        _mask(tmp_path / f"Annotations/480p/s1/{n:05d}.png")
    _mask(tmp_path / "Annotations/480p/s2/00000.png", h=10)  # wrong size
    (tmp_path / "Annotations/480p/s2/00001.png").write_bytes(
        (tmp_path / "Annotations/480p/s1/00000.png").read_bytes()[:-30])  # truncated
    # s2/00002 has no mask: ignored, not an error
    fw = FramesWithMasks.from_folder(tmp_path)
    assert len(fw) == 5
    assert fw.name(0) == "JPEGImages/480p/s1/00000.jpg"
    assert fw.ignored == [("JPEGImages/480p/s2/00002.jpg", "no_mask")]
    rgb, mask = fw.load(1)
    assert rgb.shape == (12, 16, 3) and mask.shape == (12, 16) and mask.dtype == np.float32
    assert mask.sum() == 24 and set(np.unique(mask)) == {0.0, 1.0}
    reasons = []
    for i in (3, 4):
        with pytest.raises(BadImage) as info:
            fw.load(i)
        reasons.append(info.value.reason)
    assert reasons == ["mask_size", "mask_truncated"]
    (tmp_path / "JPEGImages/1080p").mkdir()
    assert len(FramesWithMasks.from_folder(tmp_path)) == 5  # 480p chosen among several
    with pytest.raises(ValueError, match="DAVIS layout needs"):
        FramesWithMasks.from_folder(tmp_path, resolution="1080p")


def test_frames_with_masks_beside_layout(tmp_path):
    _frame(tmp_path / "clip/a.jpg")
    _mask(tmp_path / "clip/a.mask.png")
    _frame(tmp_path / "clip/b.png")  # no mask beside it
    _mask(tmp_path / "clip/orphan.mask.png")
    fw = FramesWithMasks.from_folder(tmp_path)
    assert [fw.name(i) for i in range(len(fw))] == ["clip/a.jpg", "clip/b.png"]
    assert fw.ignored == [("clip/orphan.mask.png", "mask_without_frame")]
    rgb, mask = fw.load(0)
    assert rgb.shape[:2] == mask.shape and mask.max() == 1.0
    with pytest.raises(BadImage) as info:
        fw.load(1)
    assert info.value.reason == "mask_missing" and info.value.name == "clip/b.png"
    assert pickle.loads(pickle.dumps(fw)).load(0)[1].sum() == mask.sum()
    bare = tmp_path / "bare"
    bare.mkdir()
    _frame(bare / "x.png")
    with pytest.raises(ValueError, match="mask.png"):
        FramesWithMasks.from_folder(bare)


def test_frames_with_masks_from_arrays():
    frame = np.zeros((6, 8), np.uint8)
    fw = FramesWithMasks.from_arrays([("f0", frame, np.ones((6, 8), bool)),
                                      ("f1", frame, np.full((6, 8, 1), 0.25, np.float32))])
    rgb, mask = fw.load(1)
    assert rgb.shape == (6, 8, 3) and mask.shape == (6, 8) and mask.dtype == np.float32
    assert fw.load(0)[1].min() == 1.0 and mask.max() == 0.25
    with pytest.raises(ValueError, match="mask shape"):
        FramesWithMasks.from_arrays([("x", frame, np.ones((5, 8)))])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FramesWithMasks.from_arrays([("x", frame, np.full((6, 8), 2.0))])


def test_frames_with_masks_whole_davis_folder(davis):
    fw = FramesWithMasks.from_folder(davis.root)
    assert len(fw) == davis.total and fw.ignored == [] and fw.unreadable == []
    for i in (0, len(fw) // 2, len(fw) - 1):
        rgb, mask = fw.load(i)
        assert rgb.shape == (*davis.shape, 3) and rgb.dtype == np.uint8
        assert mask.shape == davis.shape and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 0.8
