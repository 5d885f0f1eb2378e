"""One input image -> one prepared sample: decode robustly, resize, re-encode. Also the helpers
frame/mask samples share (keys, encoding). (The colorization prior is measured by the task on
its own targets before step 0, not here.)"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re

import numpy as np
from PIL import Image

from mtssl.data.images import BadImage, is_grayscale, load_rgb, os_error_reason
from mtssl.prep.options import PrepConfig
from mtssl.prep.shards import ItemResult, Sample
from mtssl.prep.walk import Item

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def sample_key(rel: str) -> str:
    """Stable WebDataset key of an input path: readable, unique (a hash of the exact path),
    without '.' (WebDataset splits key and extension at the first dot)."""
    safe = _UNSAFE.sub("_", posixpath.splitext(rel)[0]).strip("/") or "_"
    return f"{safe}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def resize_short(rgb: np.ndarray, short: int) -> np.ndarray:
    """Shrink (never enlarge) so the short side is `short`; antialiased."""
    h, w = rgb.shape[:2]
    if min(h, w) <= short:
        return rgb
    s = short / min(h, w)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC,
                                                  reducing_gap=3.0))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool -> 8-bit PNG with 0 / 255."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def meta_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def read_bytes(item: Item) -> bytes:
    try:
        return item.path.read_bytes()
    except OSError as err:
        raise BadImage(os_error_reason(err), item.rel, f"cannot read: {err.strerror or err}") from err


def prepare_image(item: Item, cfg: PrepConfig) -> ItemResult:
    """An image file -> one sample (`jpg` + `json`), or a skip with its reason."""
    try:
        data = read_bytes(item)
        rgb = load_rgb(data, max_pixels=cfg.max_pixels, name=item.rel)
    except BadImage as err:
        return ItemResult(skipped=[(item.rel, err.reason, err.detail)])
    h, w = rgb.shape[:2]
    if min(h, w) < cfg.min_side:
        return ItemResult(skipped=[(item.rel, "too_small",
                                    f"{w}x{h}, short side below min_side={cfg.min_side}")])
    jpg = encode_jpeg(resize_short(rgb, cfg.short_side), cfg.jpeg_quality)
    prepared = load_rgb(jpg)  # sizes and the grayscale count of exactly what training decodes
    meta = {"source": item.rel, "source_sha256": hashlib.sha256(data).hexdigest(),
            "source_size": [w, h], "size": [prepared.shape[1], prepared.shape[0]]}
    gray = is_grayscale(prepared)
    return ItemResult(samples=[Sample(sample_key(item.rel), {"jpg": jpg, "json": meta_json(meta)})],
                      grayscale=int(gray))
