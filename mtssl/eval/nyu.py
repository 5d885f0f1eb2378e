"""NYU Depth v2: the trunk plus an up-projection decoder (Laina et al. 2016), fine-tuned with the
berHu loss; delta < 1.25, 1.25^2, 1.25^3, abs-rel and RMSE over valid pixels.

File layout (the labeled subset exported to PNG/NPY; any RGB-D set in it works)::

    <root>/train/<id>.png|.jpg     RGB image
    <root>/train/<id>.depth.npy    float (H, W) depth in metres, or
    <root>/train/<id>.depth.png    uint16 (H, W) depth in millimetres
    <root>/test/...                the same
    <root>/SYNTHETIC               present only in generated fixtures (tests/synthetic.py)

Depth 0 or non-finite marks an invalid pixel (no Kinect return): it is masked out of the loss
and the metrics. Images without depth, or whose depth has another size, are skipped and
counted. Predictions are upsampled to each target's own resolution for the metrics, which are
pooled over all valid test pixels. A constant-depth baseline (the mean training depth) is
reported beside them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mtssl.data.images import BadImage, list_images, load_rgb
from mtssl.data.transforms import resize, to_tensor
from mtssl.eval.common import (
    EvalError,
    LoadedTrunk,
    freeze_batch_norm,
    model_input,
    result_header,
    training_order,
)
from mtssl.eval.metrics import add_sums, depth_sums, finish_depth
from mtssl.models.lasso import TapMix
from mtssl.models.resnet_v2 import norm_layer, scaled
from mtssl.validation import require

log = logging.getLogger("mtssl.eval.nyu")
SYNTHETIC_MARKER = "SYNTHETIC"
DEPTH_SUFFIXES = (".depth.npy", ".depth.png")
MEAN_DEPTH_SAMPLES = 256  # training depth maps read for the constant baseline and decoder bias


@dataclass(frozen=True)
class DepthSettings:
    """Defaults are the `paper` settings: [choice] after Laina et al. 2016 (228x304 input, berHu
    loss, batch 16); Adam with cosine decay and a 10x lower trunk learning rate."""
    train_split: str = "train"
    test_split: str = "test"
    input_size: tuple[int, int] = (228, 304)
    input: Literal["rgb", "gray"] = "rgb"
    output_stride: Literal[8, 16] | None = 16
    decoder_channels: int | None = None  # after the 1x1 reduction; null: 1024 x trunk width
    lasso: bool = False  # eval-only lasso over the block-3 units
    lasso_l1: float = 1e-3
    freeze_norm: bool = True  # keep a pre-trained trunk's batch-norm statistics and affine fixed
    iterations: int = 20000
    batch_size: int = 16
    lr: float = 1e-3
    trunk_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    hflip: bool = True
    min_depth: float = 1e-3  # predictions are clamped to [min_depth, max_depth] (metres)
    max_depth: float = 10.0
    max_train_images: int | None = None
    max_test_images: int | None = None
    workers: int = 4
    seed: int = 0

    def __post_init__(self):
        require(all(s >= 16 for s in self.input_size), "input_size",
                f"both sides must be >= 16, got {self.input_size}")
        require(self.decoder_channels is None or self.decoder_channels >= 4, "decoder_channels",
                f"must be >= 4 or null, got {self.decoder_channels}")
        for key in ("iterations", "batch_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.lr > 0 and self.trunk_lr_mult >= 0, "lr", "lr must be > 0, trunk_lr_mult >= 0")
        require(0 < self.min_depth < self.max_depth, "min_depth",
                f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


SETTINGS = DepthSettings
PRESETS = {"paper": {},
           "smoke": {"input_size": [48, 64], "output_stride": 8, "decoder_channels": 32,
                     "iterations": 80, "batch_size": 8, "lr": 3e-3, "trunk_lr_mult": 1.0,
                     "workers": 0}}


# --- data ------------------------------------------------------------------------------------

def read_depth(path: Path) -> np.ndarray:
    """(H, W) float32 metres with invalid pixels as 0; ValueError on an unusable file."""
    if path.name.endswith(".npy"):
        d = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16L", "I;16B", "I"):
                raise ValueError(f"{path}: depth PNG must be 16-bit millimetres, got {im.mode}")
            d = np.asarray(im).astype(np.float64) / 1000.0
    if d.ndim != 2 or not np.issubdtype(d.dtype, np.number) or np.iscomplexobj(d):
        raise ValueError(f"{path}: expected a 2-D numeric depth map, got {d.dtype} {d.shape}")
    d = d.astype(np.float32)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def list_pairs(folder: Path, limit: int | None) -> tuple[list[tuple[Path, Path]], list]:
    """(image, depth) pairs of a split and (item, reason) for images without depth."""
    if not folder.is_dir():
        raise EvalError(f"{folder}: missing; expected <root>/<split>/<id>.png + <id>.depth.npy "
                        "(see mtssl.eval.nyu)")
    images, problems = list_images(folder)
    pairs = []
    for image in images:
        if image.name.endswith(".depth.png"):
            continue
        stem = image.name[: -len(image.suffix)]
        depth = next((image.with_name(stem + s) for s in DEPTH_SUFFIXES
                      if image.with_name(stem + s).is_file()), None)
        if depth is None:
            problems.append((str(image), "missing_depth"))
        else:
            pairs.append((image, depth))
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise EvalError(f"{folder}: no image with a depth map ({len(problems)} without)")
    return pairs, problems


class DepthDataset(torch.utils.data.Dataset):
    """(image (3, h, w) in [0, 1] at input_size, depth (H, W) metres, reason) per (index, flip);
    training resizes the depth to input_size (nearest, so invalid zeros stay zeros)."""

    def __init__(self, pairs, order: list[tuple[int, bool]], *, size: tuple[int, int],
                 resize_depth: bool):
        self.pairs, self.order, self.size, self.resize_depth = pairs, order, size, resize_depth

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        index, flip = self.order[i]
        image_path, depth_path = self.pairs[index]
        h, w = self.size
        try:
            rgb, depth = load_rgb(image_path), read_depth(depth_path)
        except BadImage as err:
            return torch.zeros(3, h, w), torch.zeros(1, 1), err.reason
        except (ValueError, OSError) as err:
            log.warning("skipped: %s", err)
            return torch.zeros(3, h, w), torch.zeros(1, 1), "bad_depth"
        if rgb.shape[:2] != depth.shape:
            return torch.zeros(3, h, w), torch.zeros(1, 1), "size_mismatch"
        if self.resize_depth:
            depth = np.asarray(Image.fromarray(depth).resize((w, h), Image.NEAREST))
        img, depth = to_tensor(resize(rgb, (h, w))), torch.from_numpy(np.array(depth))
        if flip:
            img, depth = img.flip(-1), depth.flip(-1)
        return img, depth, ""


def collate(batch):
    images, depths, reasons = zip(*batch)
    return torch.stack(images), list(depths), list(reasons)


def mean_depth(pairs) -> float:
    """Mean valid depth over (up to MEAN_DEPTH_SAMPLES) training maps."""
    total, count = 0.0, 0
    for _, depth_path in pairs[:MEAN_DEPTH_SAMPLES]:
        try:
            d = read_depth(depth_path)
        except (ValueError, OSError):
            continue
        total, count = total + float(d[d > 0].sum()), count + int((d > 0).sum())
    if count == 0:
        raise EvalError("no valid training depth pixel (all zero or unreadable)")
    return total / count


# --- the model -------------------------------------------------------------------------------

def unpool(x: Tensor) -> Tensor:
    """Laina's 2x unpooling: each value to the top-left of a 2x2 cell, zeros elsewhere."""
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, 2 * h, 2 * w)
    out[:, :, ::2, ::2] = x
    return out


class UpProjection(nn.Module):
    """unpool -> [5x5 conv, norm, ReLU, 3x3 conv, norm] + [5x5 conv, norm] -> ReLU."""

    def __init__(self, *, in_ch: int, out_ch: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 5, padding=2, bias=False)
        self.norm1 = norm_layer(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, out_ch)
        self.proj = nn.Conv2d(in_ch, out_ch, 5, padding=2, bias=False)
        self.norm3 = norm_layer(norm, out_ch)

    def forward(self, x: Tensor) -> Tensor:  # (B, in, h, w) -> (B, out, 2h, 2w)
        x = unpool(x)
        y = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(y + self.norm3(self.proj(x)))


class DepthNet(nn.Module):
    """Trunk (stride os) -> 1x1 conv to `channels` -> up-projections to stride 2, each halving
    the channels -> 3x3 conv to depth -> bilinear to the input size."""

    def __init__(self, trunk: nn.Module, *, input_mode: str, lasso: bool, channels: int,
                 norm: str, init_depth: float):
        super().__init__()
        self.trunk, self.input_mode = trunk, input_mode
        self.mix = TapMix(num_taps=len(trunk.tap_names), mode="lasso" if lasso else "naive")
        ch = channels
        self.reduce = nn.Sequential(nn.Conv2d(trunk.out_channels, ch, 1, bias=False),
                                    norm_layer(norm, ch))
        ups = []
        for _ in range(int(math.log2(trunk.output_stride)) - 1):
            ups.append(UpProjection(in_ch=ch, out_ch=max(ch // 2, 4), norm=norm))
            ch = max(ch // 2, 4)
        self.up = nn.Sequential(*ups)
        self.predict = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.constant_(self.predict.bias, init_depth)  # start at the mean depth

    def forward(self, rgb: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B, 1, H, W) metres
        f = self.mix(self.trunk(model_input(rgb, self.input_mode)).taps)
        d = self.predict(self.up(self.reduce(f)))
        return F.interpolate(d, size=rgb.shape[-2:], mode="bilinear", align_corners=False)


def berhu(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Reverse Huber over valid pixels: L1 below c, scaled L2 above, c = max|residual| / 5."""
    r = (pred - target)[valid].abs()
    if r.numel() == 0:
        return pred.sum() * 0.0
    c = (0.2 * r.max()).clamp_min(1e-6).detach()
    return torch.where(r <= c, r, (r * r + c * c) / (2 * c)).mean()


# --- fine-tuning and evaluation --------------------------------------------------------------

def fine_tune(model: DepthNet, pairs, s: DepthSettings, *, freeze: bool, device: torch.device
              ) -> tuple[list[float], Counter]:
    order = training_order(len(pairs), s.iterations * s.batch_size, hflip=s.hflip, seed=s.seed)
    loader = torch.utils.data.DataLoader(
        DepthDataset(pairs, order, size=s.input_size, resize_depth=True),
        batch_size=s.batch_size, num_workers=s.workers, collate_fn=collate)
    model.to(device).train()
    if freeze:
        freeze_batch_norm(model.trunk)
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("trunk.", "mix."))]
    opt = torch.optim.Adam([{"params": trunk, "lr": s.lr * s.trunk_lr_mult},
                            {"params": rest}, {"params": list(model.mix.parameters())}],
                           lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.iterations)
    losses, skipped = [], Counter()
    for it, (images, depths, reasons) in enumerate(loader):
        keep = [i for i, r in enumerate(reasons) if not r]
        skipped.update(r for r in reasons if r)
        if keep:
            target = torch.stack([depths[i] for i in keep]).unsqueeze(1).to(device)  # (B,1,H,W)
            pred = model(images[keep].to(device))
            loss = berhu(pred, target, target > 0)
            penalty = model.mix.penalty()
            if penalty is not None:
                loss = loss + s.lasso_l1 * penalty
            if not torch.isfinite(loss):
                raise EvalError(f"depth fine-tuning diverged at step {it} (loss {loss.item()})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
    return losses, skipped


@torch.no_grad()
def evaluate(model: DepthNet, pairs, s: DepthSettings, *, constant: float, device: torch.device
             ) -> tuple[dict, dict, Counter]:
    """(model metrics, constant-depth baseline metrics, skipped) at each target's resolution."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        DepthDataset(pairs, [(i, False) for i in range(len(pairs))], size=s.input_size,
                     resize_depth=False),
        batch_size=s.batch_size, num_workers=s.workers, collate_fn=collate)
    sums, base, skipped = {}, {}, Counter()
    for images, depths, reasons in loader:
        skipped.update(r for r in reasons if r)
        keep = [i for i, r in enumerate(reasons) if not r]
        if not keep:
            continue
        pred = model(images[keep].to(device)).clamp(s.min_depth, s.max_depth).cpu()
        for p, i in zip(pred, keep):
            target = depths[i]  # (H, W) at the file's resolution
            up = F.interpolate(p[None], size=target.shape, mode="bilinear", align_corners=False)
            sums = add_sums(sums, depth_sums(up[0, 0], target))
            base = add_sums(base, depth_sums(torch.full_like(target, constant), target))
    if not sums:
        raise EvalError("no readable test sample")
    return finish_depth(sums), finish_depth(base), skipped


def run(loaded: LoadedTrunk, data: Path, s: DepthSettings, *, settings_name: str = "custom",
        device: torch.device = torch.device("cpu")) -> dict:
    start = time.perf_counter()
    data = Path(data)
    train, train_problems = list_pairs(data / s.train_split, s.max_train_images)
    test, test_problems = list_pairs(data / s.test_split, s.max_test_images)
    constant = mean_depth(train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = DepthNet(loaded.build(s.output_stride), input_mode=s.input, lasso=s.lasso,
                         channels=s.decoder_channels or scaled(1024, loaded.arch.width),
                         norm=loaded.arch.norm, init_depth=constant)
    losses, train_skipped = fine_tune(model, train, s, device=device,
                                      freeze=s.freeze_norm and not loaded.is_random)
    metrics, baseline, test_skipped = evaluate(model, test, s, constant=constant, device=device)
    synthetic = (data / SYNTHETIC_MARKER).exists()
    problems = train_problems + test_problems
    alpha = model.mix.coefficients()
    return {**result_header(loaded, "nyu", settings_name, s, data),
            "metrics": metrics, "constant_baseline": baseline, "constant_depth": constant,
            "synthetic": synthetic,
            "data_note": "SYNTHETIC fixture, not NYU Depth v2" if synthetic else "",
            "train_images": len(train), "test_images": len(test),
            "skipped": dict(Counter(r for _, r in problems) + train_skipped + test_skipped),
            "skipped_items": problems[:50],
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "alpha": None if alpha is None else alpha.detach().tolist(),
            "seconds": time.perf_counter() - start}
