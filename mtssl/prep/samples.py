"""One input image -> one prepared sample: decode robustly, resize, re-encode, count its colours
for the colorization prior. Also the helpers frame/mask samples share (keys, encoding)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import posixpath
import re

import numpy as np
from PIL import Image

from mtssl.data.images import BadImage, os_error_reason, is_grayscale, load_rgb
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


@functools.lru_cache(maxsize=1)
def _bins():
    """(bins (Q, 2), nearest-bin encoder) built once per process."""
    from mtssl.colour import SoftEncoder, ab_bins
    bins = ab_bins()
    return bins, SoftEncoder(bins=bins, k=1)


def num_bins() -> int:
    return int(_bins()[0].shape[0])


def colour_counts(rgb: np.ndarray, pixels: int) -> np.ndarray:
    """(Q,) int64 counts of the nearest ab bin over about `pixels` pixels on a regular grid."""
    import torch

    from mtssl.colour import bin_histogram, rgb_to_lab
    bins, encoder = _bins()
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / pixels))))
    sub = torch.from_numpy(np.ascontiguousarray(rgb[::step, ::step])).float() / 255  # (h', w', 3)
    ab = rgb_to_lab(sub, dim=-1)[..., 1:].permute(2, 0, 1)  # (2, h', w')
    return bin_histogram(encoder.nearest(ab), bins.shape[0]).numpy()


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
    prepared = load_rgb(jpg)  # the prior is measured on exactly what training will decode
    meta = {"source": item.rel, "source_sha256": hashlib.sha256(data).hexdigest(),
            "source_size": [w, h], "size": [prepared.shape[1], prepared.shape[0]]}
    gray = is_grayscale(prepared)
    return ItemResult(samples=[Sample(sample_key(item.rel), {"jpg": jpg, "json": meta_json(meta)})],
                      prior=None if gray else colour_counts(prepared, cfg.prior_pixels),
                      grayscale=int(gray))
