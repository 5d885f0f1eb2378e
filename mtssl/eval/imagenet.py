"""ImageNet-style linear probe: frozen trunk through block 3, a linear classifier on its
average-pooled block-3 features; top-1 and top-5 on the held-out split.

Two read-outs (`pool`): `grid`, the standard probe of the self-supervised literature (block-3
maps average-pooled to a small grid, about 9k dimensions at full width, a BatchNorm without
affine parameters, then the linear classifier; e.g. Goyal et al. 2019, "Scaling and
benchmarking self-supervised visual representation learning", and Zhang et al. 2016 sec. 3.2),
and `global`, one vector per image (C dimensions). The BatchNorm of a frozen-feature probe is
the fixed standardisation with the training split's per-feature mean and variance: that is
what a BatchNorm without affine parameters converges to, without its batch noise.

Data: any ImageFolder layout, `<root>/train/<class>/*.jpg` and `<root>/val/` (or `test/`) with
the same class folders. Class folders without images are skipped and reported; unreadable
images are skipped and counted.

Pooled features are extracted once per (checkpoint, data, extraction settings) and cached on
disk; the classifier is then trained on the cache. Eval-only lasso learns an alpha row over the
block-3 units: pooling is linear, so mixing pooled per-unit features equals pooling the mixed
map, and the cache holds one pooled vector per unit (U times the storage: ImageNet at full size
with 23 units of 1024 channels is about 60 GB in float16; without lasso about 2.6 GB).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mtssl.data.images import BadImage, list_images, load_rgb
from mtssl.data.transforms import to_tensor
from mtssl.eval.common import EvalError, LoadedTrunk, model_input, result_header
from mtssl.eval.metrics import topk_accuracy
from mtssl.models.lasso import TapMix
from mtssl.validation import require

log = logging.getLogger("mtssl.eval.imagenet")
CACHE_VERSION = 2


@dataclass(frozen=True)
class ProbeSettings:
    """Defaults are the `paper` settings (for a GPU); [choice]: the paper gives no probe recipe."""
    resize: int = 256  # shorter side before the centre crop
    image_size: int = 224  # centre crop side
    input: Literal["rgb", "gray"] = "rgb"  # gray: Lab L x3, the harmonized input
    pool: Literal["grid", "global"] = "grid"  # grid: the literature's probe; global: C dims
    grid: int = 3  # grid x grid cells per map under pool=grid (3: 9 x 1024 = 9,216 dims)
    output_stride: Literal[8, 16] | None = 16  # null: as pre-trained (same weights either way)
    max_per_class: int | None = None  # first N images (by name) per class and split
    batch_size: int = 128  # feature extraction
    workers: int = 8  # image decoding processes
    epochs: int = 30
    probe_batch_size: int = 1024
    lr: float = 1e-3  # Adam, cosine decay to zero
    weight_decay: float = 1e-4  # on the classifier weights
    # BatchNorm statistics of the frozen trunk: `recompute` re-estimates them on the training
    # split's images (no labels) before extracting features ("precise BN" under a change of
    # inputs, Wu & Johnson 2021 sec. 3-4); `checkpoint` keeps the pre-training mix of every
    # task's inputs (per-patch normalised L for relative position, L x3, RGB).
    bn_stats: Literal["recompute", "checkpoint"] = "recompute"
    lasso: bool = False  # eval-only lasso: learn an alpha row over the block-3 units
    lasso_l1: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        require(1 <= self.grid <= 8, "grid", f"must be in [1, 8], got {self.grid}")
        require(self.resize >= self.image_size, "resize",
                f"must be >= image_size ({self.image_size}), got {self.resize}")
        require(self.max_per_class is None or self.max_per_class >= 1, "max_per_class",
                f"must be >= 1 or null, got {self.max_per_class}")
        for key in ("batch_size", "epochs", "probe_batch_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0 and self.lasso_l1 >= 0, "weight_decay",
                "weight_decay and lasso_l1 must be >= 0")


SETTINGS = ProbeSettings
PRESETS = {"paper": {},
           "smoke": {"resize": 72, "image_size": 64, "batch_size": 32, "workers": 0,
                     "epochs": 60, "probe_batch_size": 128, "lr": 1e-2}}


# --- data ------------------------------------------------------------------------------------

def list_split(root: Path, classes: list[str] | None, max_per_class: int | None
               ) -> tuple[list[str], list[tuple[Path, int]], list[tuple[str, str]]]:
    """(classes, (image, label) items, (item, reason) problems) of one ImageFolder split.

    With `classes` None the split defines them (folders holding at least one image)."""
    if not root.is_dir():
        raise EvalError(f"{root}: missing; expected an ImageFolder split <root>/<class>/*.jpg")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    problems: list[tuple[str, str]] = []
    found: dict[str, list[Path]] = {}
    for folder in folders:
        images, bad = list_images(folder)
        problems += bad
        if not images:
            problems.append((str(folder), "empty_class"))
            log.warning("class folder %s holds no images: skipped", folder)
        elif classes is not None and folder.name not in classes:
            problems.append((str(folder), "class_not_in_train"))
        else:
            found[folder.name] = images[:max_per_class] if max_per_class else images
    classes = classes if classes is not None else sorted(found)
    if not classes:
        raise EvalError(f"{root}: no class folder holds any image")
    items = [(path, classes.index(c)) for c in sorted(found) for path in found[c]]
    return classes, items, problems


def center_crop(img: np.ndarray, *, resize: int, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> shorter side `resize`, then the central size x size crop."""
    h, w = img.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    y, x = (nh - size) // 2, (nw - size) // 2
    return img[y:y + size, x:x + size]


class CropDataset(torch.utils.data.Dataset):
    """Centre crops in [0, 1]; an unreadable image yields zeros and its skip reason."""

    def __init__(self, items: list[tuple[Path, int]], *, resize: int, size: int):
        self.items, self.resize, self.size = items, resize, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            img = center_crop(load_rgb(path), resize=self.resize, size=self.size)
            return to_tensor(img), label, ""
        except BadImage as err:
            return torch.zeros(3, self.size, self.size), label, err.reason


# --- features --------------------------------------------------------------------------------

def data_identity(items: list[tuple[Path, int]]) -> str:
    h = hashlib.sha256()
    for path, label in items:
        st = path.stat()
        h.update(f"{path.resolve()}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def extract_features(trunk: nn.Module, dataset: CropDataset, *, input_mode: str, per_tap: bool,
                     batch_size: int, workers: int, device: torch.device, grid: int = 1) -> dict:
    """Pooled block-3 features (N, T, C * grid^2) float16 (T = units if per_tap else 1) and skip
    reasons; grid 1 is global average pooling."""
    trunk.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    feats, reasons, start = [], [], time.perf_counter()
    for images, _, why in loader:
        taps = trunk(model_input(images.to(device), input_mode)).taps
        maps = list(taps.values()) if per_tap else [list(taps.values())[-1]]
        pooled = [nn.functional.adaptive_avg_pool2d(m, grid).flatten(1) for m in maps]
        feats.append(torch.stack(pooled, 1).half().cpu())  # (B, T, C * grid^2)
        reasons += list(why)
    seconds = time.perf_counter() - start
    return {"features": torch.cat(feats), "ok": torch.tensor([r == "" for r in reasons]),
            "labels": torch.tensor([label for _, label in dataset.items]),
            "skipped": [(str(p), r) for (p, _), r in zip(dataset.items, reasons) if r],
            "seconds": seconds}


def cells(s: ProbeSettings) -> int:
    """Pooling grid side: 1 for global pooling."""
    return s.grid if s.pool == "grid" else 1


@torch.no_grad()
def recompute_bn_stats(trunk: nn.Module, dataset: CropDataset, *, input_mode: str,
                       batch_size: int, workers: int, device: torch.device) -> nn.Module:
    """Every BatchNorm's running mean and variance re-estimated as the average over one pass of
    `dataset` (in order, no gradients); other parameters untouched. Returns `trunk` in eval mode."""
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass, not an exponential one
    trunk.train().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for images, _, _ in loader:
        trunk(model_input(images.to(device), input_mode))
    return trunk.eval()


def frozen_trunk(loaded: LoadedTrunk, s: ProbeSettings, train_items: list[tuple[Path, int]], *,
                 device: torch.device) -> nn.Module:
    """The trunk features are read from, with BatchNorm statistics as `s.bn_stats` says."""
    trunk = loaded.build(s.output_stride)
    if s.bn_stats == "recompute":
        recompute_bn_stats(trunk, CropDataset(train_items, resize=s.resize, size=s.image_size),
                           input_mode=s.input, batch_size=s.batch_size, workers=s.workers,
                           device=device)
    return trunk


def cached_features(loaded: LoadedTrunk, items: list[tuple[Path, int]], s: ProbeSettings, *,
                    cache_dir: Path | None, device: torch.device,
                    train_items: list[tuple[Path, int]],
                    trunk: Callable[[], nn.Module]) -> tuple[dict, bool]:
    """(features record, whether it came from the cache). `train_items`: the images BatchNorm
    statistics are recomputed on (bn_stats: recompute); `trunk()`: the frozen trunk, built
    only on a cache miss."""
    key = {"version": CACHE_VERSION, "checkpoint": loaded.identity, "data": data_identity(items),
           "resize": s.resize, "image_size": s.image_size, "input": s.input,
           "output_stride": s.output_stride or loaded.arch.output_stride, "per_tap": s.lasso,
           "grid": cells(s), "bn_stats": s.bn_stats}
    if s.bn_stats == "recompute":
        key["bn_data"] = data_identity(train_items)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"features-{digest}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception as err:  # noqa: BLE001 - a broken cache entry is recomputed
            log.warning("feature cache %s unreadable (%s): recomputing", path, err)
    record = extract_features(trunk(), CropDataset(items, resize=s.resize, size=s.image_size),
                              input_mode=s.input, per_tap=s.lasso, batch_size=s.batch_size,
                              workers=s.workers, device=device, grid=cells(s))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(record, tmp)
        tmp.replace(path)
    return record, False


# --- the probe -------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    """Standardise pooled features, mix the units (eval-only lasso) and classify linearly."""

    def __init__(self, *, mean: Tensor, std: Tensor, num_classes: int, lasso: bool):
        super().__init__()
        self.register_buffer("mean", mean)  # (T, C)
        self.register_buffer("std", std)
        self.mix = TapMix(num_taps=mean.shape[0], mode="lasso" if lasso else "naive")
        self.linear = nn.Linear(mean.shape[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, C) -> (N, classes)
        z = (x - self.mean) / self.std
        return self.linear(self.mix({str(u): z[:, u] for u in range(z.shape[1])}))


def train_probe(x: Tensor, y: Tensor, *, num_classes: int, s: ProbeSettings) -> LinearProbe:
    """Adam with cosine decay on cross-entropy (+ lasso_l1 * |alpha|_1 under eval-only lasso)."""
    x = x.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        probe = LinearProbe(mean=x.mean(0), std=x.std(0, correction=0).clamp_min(1e-6),
                            num_classes=num_classes, lasso=s.lasso)
    opt = torch.optim.Adam([{"params": [probe.linear.weight], "weight_decay": s.weight_decay},
                            {"params": [probe.linear.bias] + list(probe.mix.parameters())}],
                           lr=s.lr)
    steps_per_epoch = math.ceil(len(x) / s.probe_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(s.probe_batch_size):
            loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
            penalty = probe.mix.penalty()
            if penalty is not None:
                loss = loss + s.lasso_l1 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


def run(loaded: LoadedTrunk, data: Path, s: ProbeSettings, *, settings_name: str = "custom",
        device: torch.device = torch.device("cpu"), cache_dir: Path | None = None) -> dict:
    """Linear-probe result: top-1/top-5 on the held-out split, counts, timings, skips."""
    start = time.perf_counter()
    data = Path(data)
    held_out = next((data / n for n in ("val", "test") if (data / n).is_dir()), None)
    if held_out is None:
        raise EvalError(f"{data}: expected ImageFolder splits train/ and val/ (or test/)")
    classes, train_items, problems = list_split(data / "train", None, s.max_per_class)
    _, eval_items, eval_problems = list_split(held_out, classes, s.max_per_class)
    if not eval_items:
        raise EvalError(f"{held_out}: no images of the training classes {classes}")
    # Built at most once (recomputing BatchNorm statistics is a pass over the training images).
    trunk = functools.cache(lambda: frozen_trunk(loaded, s, train_items, device=device))
    train, cached_train = cached_features(loaded, train_items, s, cache_dir=cache_dir,
                                          device=device, train_items=train_items, trunk=trunk)
    test, cached_test = cached_features(loaded, eval_items, s, cache_dir=cache_dir, device=device,
                                        train_items=train_items, trunk=trunk)
    for split, record in (("train", train), (held_out.name, test)):
        if not record["ok"].any():
            raise EvalError(f"{data / split}: no readable image ({len(record['skipped'])} skipped)")
    probe = train_probe(train["features"][train["ok"]], train["labels"][train["ok"]],
                        num_classes=len(classes), s=s)
    ks = (1, 5) if len(classes) >= 5 else (1,)
    with torch.no_grad():
        acc = topk_accuracy(probe(test["features"][test["ok"]].float()),
                            test["labels"][test["ok"]], ks)
        train_acc = topk_accuracy(probe(train["features"][train["ok"]].float()),
                                  train["labels"][train["ok"]], (1,))
    skipped = problems + eval_problems + train["skipped"] + test["skipped"]
    images = len(train_items) + len(eval_items)
    seconds = train["seconds"] + test["seconds"]
    alpha = probe.mix.coefficients()
    return {**result_header(loaded, "imagenet", settings_name, s, data),
            "metrics": {f"top{k}": v for k, v in acc.items()} | {"train_top1": train_acc[1]},
            "classes": classes, "train_images": int(train["ok"].sum()),
            "eval_images": int(test["ok"].sum()), "eval_split": held_out.name,
            "skipped": dict(Counter(r for _, r in skipped)), "skipped_items": skipped[:50],
            "features_cached": cached_train and cached_test,
            "extract_images_per_s": images / max(seconds, 1e-9),
            "alpha": None if alpha is None else alpha.detach().tolist(),
            "seconds": time.perf_counter() - start}
