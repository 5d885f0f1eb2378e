"""Relative position (Doersch et al. 2015): which of the 8 neighbours is the second patch?

Sampler: resize the image to a random area (where the grid fits), lay a 3x3 grid of patches
with gaps and jitter (the gap and jitter stop the net from matching edges and textures across
the border), take the centre patch and `pairs` of its neighbours, each patch normalised to zero
mean and unit variance on its own and some randomly downsampled and upsampled again (against
low-level cues; Doersch et al. 2015, as issue 9 lists them; docs/experiments.md).
Several pairs share one grid's centre: the image is decoded, resized and its centre patch
run through the trunk once for all of them. Head: two residual units per patch, flatten,
join each (centre, neighbour) pair, three fully connected residual units, 8-way classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.data.transforms import network_input, resize, to_tensor
from mtssl.models.heads import patch_tower
from mtssl.models.resnet_v2 import scaled
from mtssl.tasks.base import (
    Features,
    SkipSample,
    TaskConfig,
    TaskDef,
    TaskHead,
    TaskOutput,
    TrunkInfo,
    feature_size,
)
from mtssl.validation import require

# The 8 neighbours of the centre cell, in label order: (row, col) offsets.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class RelativePositionConfig(TaskConfig):
    patch_size: int = 96
    gap: int = 48
    jitter: int = 7
    min_pixels: int = 150_000  # the image is resized to a random area in [min, max] pixels
    # (in the part of that range where the grid fits: too small only if no part does)
    max_pixels: int = 450_000
    max_upscale: float = 2.0  # images needing more enlargement than this are skipped as too small
    color_drop: bool = True  # without harmonization: keep one colour channel, noise the others
    fc_width: int = 4096  # width of the fully connected residual units (scaled by trunk width)
    pairs: int = 8  # (centre, neighbour) pairs per grid: batch_size grids give batch_size * pairs
    normalize_patches: bool = True  # each patch to zero mean, unit variance on its own
    downsample_prob: float = 0.3  # chance a patch is shrunk to as few as `downsample_pixels`
    downsample_pixels: int = 100  # ... total pixels, then enlarged back (against pixel-level cues)

    def __post_init__(self):
        super().__post_init__()
        require(self.patch_size >= 8, "patch_size", f"must be >= 8, got {self.patch_size}")
        require(self.gap >= 0 and self.jitter >= 0, "gap",
                f"gap and jitter must be >= 0, got {self.gap}, {self.jitter}")
        require(self.jitter * 2 <= self.gap or self.gap == 0, "jitter",
                f"jitter ({self.jitter}) must be at most half the gap ({self.gap}) so patches never overlap")
        require(0 < self.min_pixels <= self.max_pixels, "min_pixels",
                f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        require(self.max_pixels >= self.span ** 2, "max_pixels",
                f"the 3x3 grid needs {self.span}x{self.span} px; max_pixels={self.max_pixels} is too few")
        require(self.max_upscale >= 1.0, "max_upscale", f"must be >= 1, got {self.max_upscale}")
        require(1 <= self.pairs <= 8, "pairs", f"must be in [1, 8], got {self.pairs}")
        require(0 <= self.downsample_prob <= 1, "downsample_prob",
                f"must be in [0, 1], got {self.downsample_prob}")
        require(4 <= self.downsample_pixels, "downsample_pixels",
                f"must be >= 4, got {self.downsample_pixels}")

    @property
    def span(self) -> int:
        """Side of the square the jittered 3x3 grid can occupy."""
        return 3 * self.patch_size + 2 * self.gap + 2 * self.jitter


class RelativePositionSampler:
    def __init__(self, *, cfg: RelativePositionConfig, harmonize: bool):
        self.cfg, self.harmonize = cfg, harmonize

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        h, w = img.shape[:2]
        # The area is drawn from the part of [min_pixels, max_pixels] where the grid fits and the
        # enlargement stays within max_upscale: a skip marks the image unusable for good
        # (data/stream.py), so it must depend on the image, not on one draw.
        lo = max(c.min_pixels, h * w * (c.span / min(h, w)) ** 2)
        hi = min(c.max_pixels, h * w * c.max_upscale ** 2)
        if lo > hi:
            raise SkipSample("too_small")
        scale = np.sqrt(rng.uniform(lo, hi) / (h * w))
        # round() may land a pixel short of the span on the image's short side
        nh, nw = max(c.span, int(round(h * scale))), max(c.span, int(round(w * scale)))
        img = resize(img, (nh, nw))
        y0 = int(rng.integers(c.jitter, nh - c.span + c.jitter + 1))
        x0 = int(rng.integers(c.jitter, nw - c.span + c.jitter + 1))
        labels = rng.permutation(8)[:c.pairs]
        step = c.patch_size + c.gap
        crops = []
        for r, col in ((1, 1), *((1 + NEIGHBOURS[k][0], 1 + NEIGHBOURS[k][1]) for k in labels)):
            y = y0 + r * step + int(rng.integers(-c.jitter, c.jitter + 1))
            x = x0 + col * step + int(rng.integers(-c.jitter, c.jitter + 1))
            crop = to_tensor(img[y:y + c.patch_size, x:x + c.patch_size])
            if rng.random() < c.downsample_prob:
                crop = pixelate(crop, rng.uniform(c.downsample_pixels, crop[0].numel()))
            crops.append(crop)
        # (1 + pairs, 3, P, P): the centre, then the neighbours that `label` names, in order
        return {"patches": self.transform(torch.stack(crops), rng).numpy(),
                "label": labels.astype(np.int64)}

    def transform(self, patches: Tensor, rng: np.random.Generator) -> Tensor:
        """(N, 3, P, P) RGB in [0, 1] -> network inputs, each patch normalised and colour-dropped
        on its own; the grid's patches in one colour conversion (the sampler: 1.8 ms a grid on
        one core, 4.6 patch by patch; docs/experiments.md section 11)."""
        c = self.cfg
        x = network_input(patches, self.harmonize)
        if not self.harmonize and c.color_drop:
            # Chromatic aberration lets a net locate a patch in the lens; one channel hides it.
            for patch in x:
                keep = int(rng.integers(3))
                for ch in range(3):
                    if ch != keep:
                        noise = rng.normal(0.0, 0.01 * float(patch[ch].std()) + 1e-6, patch[ch].shape)
                        patch[ch] = torch.from_numpy(noise.astype(np.float32))
        if c.normalize_patches:
            x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)
        return x


def pixelate(patch: Tensor, pixels: float) -> Tensor:
    """(3, P, P) -> shrunk to about `pixels` pixels in all, then enlarged back to P x P."""
    side = max(2, int(round(pixels ** 0.5)))
    small = F.interpolate(patch[None], size=(side, side), mode="area")
    return F.interpolate(small, size=patch.shape[-2:], mode="bilinear", align_corners=False)[0]


def fc_norm(kind: str, dim: int) -> nn.Module:
    return nn.BatchNorm1d(dim) if kind == "batch" else nn.LayerNorm(dim)


class FCResidualUnit(nn.Module):
    """Pre-activation residual unit with fully connected layers."""

    def __init__(self, *, dim: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(fc_norm(norm, dim), nn.ReLU(), nn.Linear(dim, dim),
                                  fc_norm(norm, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class RelativePositionHead(TaskHead):
    def __init__(self, *, in_ch: int, patch_size: int, output_stride: int, width: float,
                 fc_width: int, norm: str = "batch"):
        super().__init__()
        self.tower = patch_tower(in_ch=in_ch, width=width, norm=norm)
        side = feature_size(feature_size(patch_size, output_stride), 4)  # after the two stride-2 units
        tower_ch = scaled(512, width)
        dim = scaled(fc_width, width)
        self.join = nn.Linear(2 * tower_ch * side * side, dim)
        self.units = nn.Sequential(*(FCResidualUnit(dim=dim, norm=norm) for _ in range(3)))
        self.classify = nn.Sequential(fc_norm(norm, dim), nn.ReLU(), nn.Linear(dim, 8))

    def logits(self, patches: Tensor, features: Features) -> Tensor:
        b, n = patches.shape[:2]  # patches: (B, 1 + K, 3, P, P), centre first
        maps = self.tower(features(patches.flatten(0, 1))).flatten(1).view(b, n, -1)  # (B, 1+K, D)
        centre = maps[:, :1].expand(-1, n - 1, -1)  # (B, K, D)
        pair = torch.cat([centre, maps[:, 1:]], dim=2).flatten(0, 1)  # (B*K, 2D)
        return self.classify(self.units(self.join(pair)))  # (B*K, 8)

    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        logits = self.logits(batch["patches"], features).float()  # the loss in fp32 (autocast)
        label = batch["label"].flatten()  # (B*K,)
        loss = F.cross_entropy(logits, label)
        acc = (logits.argmax(1) == label).float().mean()  # on the device: read at log time
        return TaskOutput(loss=loss, metrics={"acc": acc}, chance={"acc": 1 / len(NEIGHBOURS)})


def build_head(cfg: RelativePositionConfig, trunk: TrunkInfo) -> RelativePositionHead:
    return RelativePositionHead(in_ch=trunk.channels, patch_size=cfg.patch_size,
                                output_stride=trunk.output_stride, width=trunk.width,
                                fc_width=cfg.fc_width, norm=trunk.norm)


TASK = TaskDef(
    name="relative_position",
    task_id=0,
    config_cls=RelativePositionConfig,
    source="images",
    input_key="patches",
    build_sampler=lambda cfg, trunk, harmonize: RelativePositionSampler(cfg=cfg, harmonize=harmonize),
    build_head=build_head,
    harmonize=True,
    enabled_when_absent=True,
)
