"""Image sources every task sampler reads from: robust decoding of any image file to 8-bit RGB,
deterministic folder listing, skip bookkeeping, and frame/mask pairs for motion segmentation."""
from __future__ import annotations

import collections
import contextlib
import io
import operator
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MASK_SUFFIX = ".mask.png"
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_BYTES = (bytes, bytearray, memoryview)
_GRAY_CHECK_PIXELS = 1 << 18


class BadImage(Exception):
    """An item that cannot be used; `reason` is a short slug for counting (e.g. `truncated`)."""

    def __init__(self, reason: str, name: str, detail: str):
        super().__init__(f"{name}: {detail} [{reason}]")
        self.reason, self.name, self.detail = reason, name, detail

    def __reduce__(self):
        return type(self), (self.reason, self.name, self.detail)


def os_error_reason(err: OSError) -> str:
    return ("missing" if isinstance(err, FileNotFoundError) else "permission_denied"
            if isinstance(err, PermissionError) else "unreadable")


def _open_stream(source, label: str):
    if isinstance(source, _BYTES):
        if len(source) == 0:
            raise BadImage("empty_file", label, "zero bytes")
        return io.BytesIO(source)
    try:
        f = open(source, "rb")
    except OSError as e:
        raise BadImage(os_error_reason(e), label, f"cannot open file: {e.strerror or e}") from e
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise BadImage("empty_file", label, "zero-byte file")
    return f


@contextlib.contextmanager
def _decoded(source, *, max_pixels: int, name: str | None):
    """Yield (fully decoded PIL image, label); every failure becomes a BadImage."""
    label = name or ("<bytes>" if isinstance(source, _BYTES) else os.fspath(source))
    with _open_stream(source, label) as f:
        try:
            with warnings.catch_warnings():
                # Pillow warns above its own limit; our max_pixels check below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f)
        except Image.DecompressionBombError as e:
            raise BadImage("decompression_bomb", label, str(e)) from e
        except UnidentifiedImageError as e:
            raise BadImage("not_an_image", label, "not a recognised image format") from e
        except MemoryError:
            raise
        except Exception as e:  # decoders raise many types on malformed headers
            raise BadImage("corrupt", label, f"malformed header ({e})") from e
        with im:
            w, h = im.size
            if w * h > max_pixels:  # header only: nothing decoded yet
                raise BadImage("decompression_bomb", label,
                               f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
            if w * h == 0:
                raise BadImage("corrupt", label, f"image has no pixels ({w}x{h})")
            try:
                im.load()
            except MemoryError:
                raise
            except Exception as e:
                truncated = isinstance(e, EOFError) or "truncated" in str(e)
                raise BadImage("truncated" if truncated else "corrupt", label,
                               f"decoding failed ({e})") from e
            yield im, label


def _upright(im: Image.Image) -> Image.Image:
    """The decoded image turned as its EXIF orientation says (PIL's own transposes)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF: show the pixels as stored
        return im


def _wide_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit and float data -> uint8 by the data type's range, never by clipping.

    I;16 uses 0..65535; I (Pillow's 16-bit PNG/PGM, 32-bit TIFF) uses 0..65535 when the data fit,
    else its min..max; F uses 0..1 when the data fit, else its min..max."""
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    if hi <= lo:  # constant data outside the usual range: no contrast to keep
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8; transparent areas become white, not black."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _pil_to_rgb(im: Image.Image, label: str) -> np.ndarray:
    if im.mode in _WIDE_MODES:
        gray = _wide_to_uint8(np.asarray(im), im.mode)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            return _composite_over_white(np.asarray(im.convert("RGBA")))
        return np.array(im.convert("RGB"))
    except ValueError as e:
        raise BadImage("unsupported_mode", label, f"cannot convert mode {im.mode} ({e})") from e


def load_rgb(source: str | os.PathLike | bytes, *, max_pixels: int = 64_000_000,
             name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to (H, W, 3) uint8 RGB, EXIF orientation applied.

    Embedded ICC profiles are not applied: pixel values are taken as sRGB and CMYK/YCbCr/LAB use
    Pillow's conversions. Raises BadImage (reasons: empty_file, missing, permission_denied,
    unreadable, not_an_image, decompression_bomb, truncated, corrupt, unsupported_mode)."""
    with _decoded(source, max_pixels=max_pixels, name=name) as (im, label):
        return _pil_to_rgb(_upright(im), label)


def _mask_to_float(m: np.ndarray) -> np.ndarray:
    """Mask array -> float32 in [0, 1]. bool and 0/1 integer labels are binary; other integers
    scale by their type (uint16 by 65535, else 255); floats must already lie in [0, 1]."""
    if m.dtype == bool:
        return m.astype(np.float32)
    if np.issubdtype(m.dtype, np.integer):
        lo, hi = int(m.min()), int(m.max())
        full = 1 if hi <= 1 else 65535 if m.dtype.itemsize == 2 or hi > 255 else 255
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer mask values must lie in 0..65535, got {lo}..{hi}")
        return (m.astype(np.float32) / full).astype(np.float32)
    if np.issubdtype(m.dtype, np.floating):
        if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError("float mask values must be finite and within [0, 1]")
        return m.astype(np.float32)
    raise ValueError(f"unsupported mask dtype {m.dtype}")


def load_mask(source: str | os.PathLike | bytes, *, max_pixels: int = 64_000_000,
              name: str | None = None) -> np.ndarray:
    """Decode a foreground mask to (H, W) float32 in [0, 1].

    Palette (P) masks, as in DAVIS 2017, count every non-zero index as foreground; colour masks
    use the brightest channel; 0/1 label images are read as binary."""
    with _decoded(source, max_pixels=max_pixels, name=name) as (im, label):
        im = _upright(im)
        if im.mode == "P":
            m = np.asarray(im) > 0
        elif im.mode in ("RGB", "RGBA"):
            m = np.asarray(im)[..., :3].max(axis=2)
        elif im.mode in _WIDE_MODES or im.mode in ("1", "L"):
            m = np.asarray(im)
        else:
            try:
                m = np.asarray(im.convert("L"))
            except ValueError as e:
                raise BadImage("unsupported_mode", label, f"mask mode {im.mode} ({e})") from e
        try:
            m = _mask_to_float(m)
        except ValueError as e:
            raise BadImage("bad_values", label, str(e)) from e
        return m


def to_rgb_uint8(a: np.ndarray, *, name: str = "<array>") -> np.ndarray:
    """In-memory image -> new (H, W, 3) uint8 array. Accepts (H, W), (H, W, 1|3|4) as uint8,
    bool, uint16 (scaled by 65535), other integers within 0..255, or floats within [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ValueError(f"{name}: expected (H, W) or (H, W, 1|3|4) image, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        numeric = np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
        top = 1.0 if numeric and np.issubdtype(a.dtype, np.floating) else 255
        if not numeric or not np.isfinite(a).all() or a.min() < 0 or a.max() > top:
            raise ValueError(f"{name}: {a.dtype} image values must lie in [0, {top}]")
        a = np.rint(a * (255.0 / top)).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    return _composite_over_white(a) if a.shape[2] == 4 else np.array(a, np.uint8)


def is_grayscale(rgb: np.ndarray, tol: int = 3) -> bool:
    """True when R, G and B agree within `tol` everywhere (large images: strided subsample)."""
    if rgb.ndim == 2:
        return True
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / _GRAY_CHECK_PIXELS))))
    s = rgb[::step, ::step, :3].astype(np.int16)  # (h', w', 3)
    return bool((s.max(axis=2) - s.min(axis=2)).max() <= tol)


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under `root` (recursive, sorted, by extension, case-insensitive).

    Symlinked folders are followed, but each real folder is listed once, so link loops end.
    Also returns (path, reason) for folders that could not be read and for broken links."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found or not a directory: {root}")
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((str(folder), os_error_reason(e)))
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():
                    subdirs.append(Path(e.path))
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    if e.is_file():
                        found.append(Path(e.path))
                    elif e.is_symlink():
                        problems.append((e.path, "broken_link"))
            except OSError as err:
                problems.append((e.path, os_error_reason(err)))
        stack.extend(reversed(subdirs))  # depth-first in name order: deterministic
    return sorted(found), sorted(problems)


def _unique_names(names, what: str) -> list[str]:
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{what}: no items")
    dup = [n for n, c in collections.Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"{what}: duplicate names {dup[:5]}")
    return names


class _Named:
    """Indexed items with stable unique names; subclasses set `_names` and define `load`."""
    _names: list[str]

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        return self._names[self._index(i)]

    def _index(self, i) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self._names):
            raise IndexError(f"index {i} out of range for {len(self._names)} items")
        return i


class ImageSource(_Named):
    """Indexed images: `name(i)` is a stable id, `load(i)` returns a new (H, W, 3) uint8 array
    or raises BadImage."""

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError


class FolderImages(ImageSource):
    """Image files under a folder, named by their posix path relative to it.

    Pickles as paths only (TaskStream keeps the cache of decoded images). Unreadable folders are
    kept in `unreadable` as (path, reason)."""

    def __init__(self, root: str | os.PathLike, *, max_pixels: int = 64_000_000):
        self.root = Path(root)
        paths, self.unreadable = list_images(self.root)
        if not paths:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                             f"{self.root}; unreadable: {self.unreadable}")
        self._names = [p.relative_to(self.root).as_posix() for p in paths]
        self.max_pixels = int(max_pixels)

    def path(self, i: int) -> Path:
        return self.root / self.name(i)

    def load(self, i: int) -> np.ndarray:
        i = self._index(i)
        return load_rgb(self.root / self._names[i], max_pixels=self.max_pixels,
                        name=self._names[i])


class ArrayImages(ImageSource):
    """In-memory named images; gray/RGBA/uint16/float inputs become RGB uint8 on construction."""

    def __init__(self, items: list[tuple[str, np.ndarray]]):
        items = list(items)
        self._names = _unique_names((n for n, _ in items), "ArrayImages")
        self._arrays = [to_rgb_uint8(a, name=n) for n, (_, a) in zip(self._names, items)]

    def load(self, i: int) -> np.ndarray:
        return self._arrays[self._index(i)].copy()


class FramesWithMasks(_Named):
    """Video frames with foreground masks for motion segmentation; build with `from_folder` or
    `from_arrays`. `load(i)` -> ((H, W, 3) uint8, (H, W) float32 in [0, 1])."""

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, resolution: str | None = None,
                    max_pixels: int = 64_000_000) -> FramesWithMasks:
        """Pairs from one of two layouts (chosen by what `root` holds):

        DAVIS: `JPEGImages/<res>/<seq>/<n>.jpg` with `Annotations/<res>/<seq>/<n>.png`; frames
        without a mask are ignored (listed in `ignored`). `resolution` picks <res>; by default
        the only one, or 480p when several exist.
        Mask beside frame: every image `<stem>.<ext>` is a frame whose mask is
        `<stem>.mask.png` in the same folder; a missing mask raises BadImage('mask_missing')
        at load, masks without a frame are listed in `ignored`."""
        root = Path(root)
        if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
            return _FolderPairs(root, *_davis_pairs(root, resolution), max_pixels=max_pixels)
        return _FolderPairs(root, *_beside_pairs(root), max_pixels=max_pixels)

    @classmethod
    def from_arrays(cls, items: list[tuple[str, np.ndarray, np.ndarray]]) -> FramesWithMasks:
        return _ArrayPairs(items)


def _davis_pairs(root: Path, resolution: str | None):
    jpeg_root = root / "JPEGImages"
    choices = sorted(d.name for d in jpeg_root.iterdir() if d.is_dir())
    if resolution is None:
        if len(choices) != 1 and "480p" not in choices:
            raise ValueError(f"{jpeg_root} holds resolutions {choices}: pass resolution=")
        resolution = choices[0] if len(choices) == 1 else "480p"
    frame_dir, mask_dir = jpeg_root / resolution, root / "Annotations" / resolution
    if not frame_dir.is_dir() or not mask_dir.is_dir():
        raise ValueError(f"DAVIS layout needs {frame_dir} and {mask_dir}")
    frames, bad_frames = list_images(frame_dir)
    masks, bad_masks = list_images(mask_dir)
    mask_of = {m.relative_to(mask_dir).with_suffix("").as_posix(): m for m in masks}
    pairs, ignored = [], []
    for f in frames:
        m = mask_of.get(f.relative_to(frame_dir).with_suffix("").as_posix())
        if m is None:
            ignored.append((f.relative_to(root).as_posix(), "no_mask"))
        else:
            pairs.append((f.relative_to(root).as_posix(), m.relative_to(root).as_posix()))
    if not pairs:
        raise ValueError(f"DAVIS layout under {root}: no frame in {frame_dir} has a mask")
    return pairs, ignored, bad_frames + bad_masks


def _beside_pairs(root: Path):
    images, unreadable = list_images(root)
    is_mask = [p.name.lower().endswith(MASK_SUFFIX) for p in images]
    mask_of = {(p.parent, p.name[: -len(MASK_SUFFIX)]): p
               for p, m in zip(images, is_mask) if m}
    frames = [p for p, m in zip(images, is_mask) if not m]
    if not mask_of or not frames:
        raise ValueError(
            f"no frame/mask pairs under {root}: expected DAVIS (JPEGImages/<res>/<seq>/*.jpg + "
            f"Annotations/<res>/<seq>/*.png) or '<stem>{MASK_SUFFIX}' beside each frame")
    pairs = []
    for f in frames:
        m = mask_of.pop((f.parent, f.stem), f.with_name(f.stem + MASK_SUFFIX))
        pairs.append((f.relative_to(root).as_posix(), m.relative_to(root).as_posix()))
    ignored = sorted((m.relative_to(root).as_posix(), "mask_without_frame")
                     for m in mask_of.values())
    return pairs, ignored, unreadable


class _FolderPairs(FramesWithMasks):
    def __init__(self, root: Path, pairs, ignored, unreadable, *, max_pixels: int):
        self.root, self.max_pixels = root, max_pixels
        self.ignored, self.unreadable = ignored, unreadable
        self._names, self._masks = [f for f, _ in pairs], [m for _, m in pairs]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = self._index(i)
        name, mask_name = self._names[i], self._masks[i]
        rgb = load_rgb(self.root / name, max_pixels=self.max_pixels, name=name)
        try:
            mask = load_mask(self.root / mask_name, max_pixels=self.max_pixels, name=mask_name)
        except BadImage as e:
            raise BadImage(f"mask_{e.reason}", name, f"mask {mask_name}: {e.detail}") from e
        if mask.shape != rgb.shape[:2]:
            raise BadImage("mask_size", name, f"mask {mask_name} is {mask.shape[1]}x"
                           f"{mask.shape[0]}, frame is {rgb.shape[1]}x{rgb.shape[0]}")
        return rgb, mask


class _ArrayPairs(FramesWithMasks):
    def __init__(self, items):
        items = list(items)
        self._names = _unique_names((n for n, _, _ in items), "FramesWithMasks.from_arrays")
        self._frames, self._masks = [], []
        for name, (_, frame, mask) in zip(self._names, items):
            rgb, m = to_rgb_uint8(frame, name=str(name)), np.asarray(mask)
            try:
                m = _mask_to_float(m[..., 0] if m.ndim == 3 and m.shape[2] == 1 else m)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
            if m.shape != rgb.shape[:2]:
                raise ValueError(f"{name}: mask shape {m.shape} != frame shape {rgb.shape[:2]}")
            self._frames.append(rgb)
            self._masks.append(m)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = self._index(i)
        return self._frames[i].copy(), self._masks[i].copy()
