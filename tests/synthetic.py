"""SYNTHETIC stand-ins for the real data sets in ../shared/data, written into a test's folder so
that core behaviour is tested on a fresh clone; the real sets remain an extra (`shared_data`
marker). Photos are crops of the real photos bundled with scikit-image (mtssl.data.embedded),
clips are mtssl's synthetic motion clips (a photo-textured blob moving over a panning photo,
with its exact mask), labelled images are coloured noise, detection images coloured squares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtssl.data.embedded import embedded_photos, synthetic_motion_clips
from mtssl.data.images import is_grayscale
from mtssl.eval.nyu import SYNTHETIC_MARKER

# Far apart in RGB, so that even a random trunk separates the classes (red, blue first).
PALETTE = np.array([[200, 40, 40], [40, 40, 200], [40, 180, 40], [220, 200, 40], [180, 40, 180],
                    [40, 190, 190], [240, 140, 40], [120, 120, 120], [250, 250, 250], [20, 20, 20]])


def photos(dest: Path, n: int, *, seed: int = 0) -> list[Path]:
    """n JPEG crops of the bundled colour photos, 40-192 px a side like the Caltech pool (long
    side <= 192); some short sides fall below 64, so a resize to 64 must not enlarge them."""
    rng = np.random.default_rng(seed)
    pool = embedded_photos()
    colour = [pool.load(i) for i in range(len(pool)) if not is_grayscale(pool.load(i))]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rgb = colour[i % len(colour)]
        w, h = (int(v) for v in rng.integers(40, 193, size=2))
        ch = int(rgb.shape[0] * rng.uniform(0.3, 1.0))
        cw = min(rgb.shape[1], int(ch * w / h))
        y, x = rng.integers(0, rgb.shape[0] - ch + 1), rng.integers(0, rgb.shape[1] - cw + 1)
        path = dest / f"synthetic_{i:03d}.jpg"
        Image.fromarray(rgb[y:y + ch, x:x + cw]).resize((w, h)).save(path, quality=90)
        out.append(path)
    return out


def davis(root: Path, lengths: dict[str, int], *, size=(120, 160), seed: int = 0) -> Path:
    """The DAVIS 2016 layout: JPEGImages/480p/<seq>/%05d.jpg and Annotations/480p/<seq>/%05d.png
    (0/255), one synthetic motion clip per sequence."""
    for k, (seq, n) in enumerate(lengths.items()):
        fw, _ = synthetic_motion_clips(num_clips=1, frames_per_clip=n, size=size, seed=seed + k)
        img_dir = root / "JPEGImages" / "480p" / seq
        ann_dir = root / "Annotations" / "480p" / seq
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t in range(n):
            rgb, mask = fw.load(t)
            Image.fromarray(rgb).save(img_dir / f"{t:05d}.jpg", quality=95)
            Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(ann_dir / f"{t:05d}.png")
    return root


def write_video(path: Path, frames: list[np.ndarray], **options) -> Path:
    """Encode RGB frames (mpeg4); no frames gives a container with an empty video stream."""
    import av
    h, w = frames[0].shape[:2] if frames else (48, 64)
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if not frames:
            c.start_encoding()
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def videos(dest: Path, names: list[str], *, frames: int = 30, size=(144, 192),
           seed: int = 100) -> list[Path]:
    """One mp4 per name, each a synthetic motion clip of `frames` frames."""
    dest.mkdir(parents=True, exist_ok=True)
    _, clips = synthetic_motion_clips(num_clips=len(names), frames_per_clip=frames, size=size,
                                      seed=seed)
    return [write_video(dest / name, clip) for name, clip in zip(names, clips)]


def image_folder(root: Path, spec: dict[str, int], *, size: int = 24) -> Path:
    """ImageFolder of coloured-noise images: spec maps 'split/class' -> image count; the i-th
    class name in sorted order gets PALETTE[i] in every split."""
    rng = np.random.default_rng(0)
    classes = sorted({where.split("/")[-1] for where in spec})
    for where, n in spec.items():
        folder = root / where
        folder.mkdir(parents=True)
        colour = PALETTE[classes.index(where.split("/")[-1])]
        for i in range(n):
            img = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def voc(root: Path, splits: dict[str, int], cls: str = "square", *, seed: int = 0) -> Path:
    """PASCAL VOC layout with one class: a coloured square on a noise background per image,
    its box in Annotations/<id>.xml, ImageSets/Main/<split>.txt listing the ids."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        ids = [f"{split}_{i:03d}" for i in range(n)]
        for image_id in ids:
            h, w = 120, 160
            img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            side = int(rng.integers(30, 70))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            img[y:y + side, x:x + side] = PALETTE[0]
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg")
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
                f"<height>{h}</height><depth>3</depth></size><object><name>{cls}</name>"
                f"<difficult>0</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                f"<xmax>{x + side}</xmax><ymax>{y + side}</ymax></bndbox></object></annotation>")
        (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


# --- NYU depth layout (mtssl.eval.nyu) ------------------------------------------------------

def synthetic_scene(rng: np.random.Generator, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A SYNTHETIC RGB-D pair whose depth is readable from the image: a floor receding from
    about 2 m (bottom) to 5-8 m (top) and 1-3 boxes at 1-4 m; brightness ~ 1.2 / depth under a
    random full-value hue per surface, with mild texture; a Kinect-like hole of depth 0."""
    h, w = size
    far, near = rng.uniform(5, 8), rng.uniform(1.5, 2.5)
    depth = np.repeat(np.linspace(far, near, h)[:, None], w, axis=1)  # (H, W)
    surface = np.zeros((h, w), np.int64)
    for k in range(1, int(rng.integers(1, 4)) + 1):
        bh, bw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 6, w // 2))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        depth[y:y + bh, x:x + bw] = rng.uniform(1.0, 4.0)
        surface[y:y + bh, x:x + bw] = k
    hues = rng.uniform(0.35, 1.0, size=(4, 3))
    hues /= hues.max(axis=1, keepdims=True)  # full value: brightness carries the depth
    texture = 1 + 0.08 * rng.standard_normal((h, w))
    rgb = np.clip((1.2 / depth * texture)[..., None] * hues[surface], 0, 1)
    hy, hx = int(rng.integers(0, h - h // 6)), int(rng.integers(0, w - w // 6))
    depth[hy:hy + h // 6, hx:hx + w // 6] = 0.0  # invalid: no return
    return (rgb * 255).round().astype(np.uint8), depth.astype(np.float32)


def write_synthetic_nyu(root: str | Path, *, train: int = 48, test: int = 16,
                        size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Generate SYNTHETIC fixtures in the NYU layout (train depth as .npy metres, test as
    16-bit PNG millimetres, so both readers are exercised) with a SYNTHETIC marker file."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgb, depth = synthetic_scene(rng, size)
            Image.fromarray(rgb).save(folder / f"{i:05d}.png")
            if split == "train":
                np.save(folder / f"{i:05d}.depth.npy", depth)
            else:
                mm = np.round(depth * 1000).astype(np.uint16)
                Image.fromarray(mm).save(folder / f"{i:05d}.depth.png")
    (root / SYNTHETIC_MARKER).write_text(
        "SYNTHETIC RGB-D fixtures generated by tests/synthetic.py write_synthetic_nyu, not NYU Depth "
        f"v2: {train} train / {test} test scenes of {size[0]}x{size[1]}, seed {seed}.\n")
    return root
