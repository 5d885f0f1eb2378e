"""Exemplar (Dosovitskiy et al. 2014) with a triplet loss, as in the paper.

Each image is a pseudo-class: two views of one patch, each translated, rotated, scaled and
colour-shifted, are positives; views from other images in the batch are the negatives.
Head: two residual units as in relative position; the flattened, L2-normalised map is the
embedding. Loss: max(D(a, p) - D(a, n) + M, 0) with D the squared Euclidean distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtssl.data.transforms import network_input, resize, to_tensor
from mtssl.models.heads import patch_tower
from mtssl.tasks.base import Features, SkipSample, TaskConfig, TaskDef, TaskHead, TaskOutput
from mtssl.validation import require

COLLAPSED_SPREAD = 0.1  # below this, images are indistinguishable at the triplet margin's scale


@dataclass(frozen=True)
class ExemplarConfig(TaskConfig):
    batch_size: int = 8
    image_size: int = 256
    patch_size: int = 96
    margin: float = 0.5
    # semihard (Schroff et al. 2015, FaceNet sec. 3.2): per anchor, the closest negative that
    # is still farther than the positive (else the farthest one); hardest from step 0 lets the
    # trivial solution win: every image at one point, loss exactly the margin (issue 9).
    negatives: Literal["semihard", "hardest", "random"] = "semihard"
    max_translate: float = 0.2  # fraction of the patch size
    max_rotate: float = 20.0  # degrees
    scale_range: tuple[float, float] = (0.7, 1.4)
    color_shift: float = 0.1  # per-channel gain/offset amplitude, and saturation change

    def __post_init__(self):
        super().__post_init__()
        require(self.batch_size >= 2, "batch_size",
                f"must be >= 2: negatives come from other images in the batch, got {self.batch_size}")
        require(self.patch_size <= self.image_size, "patch_size",
                f"must be <= image_size ({self.image_size}), got {self.patch_size}")
        require(self.margin > 0, "margin", f"must be > 0, got {self.margin}")
        lo, hi = self.scale_range
        require(0 < lo <= hi, "scale_range", f"need 0 < low <= high, got {self.scale_range}")
        require(0 <= self.max_translate <= 1, "max_translate",
                f"must be in [0, 1], got {self.max_translate}")


class ExemplarSampler:
    def __init__(self, *, cfg: ExemplarConfig, harmonize: bool):
        self.cfg, self.harmonize = cfg, harmonize

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        if min(img.shape[:2]) < c.patch_size:
            raise SkipSample("too_small")
        image = to_tensor(resize(img, (c.image_size, c.image_size)))  # (3, S, S)
        half = c.patch_size / c.image_size  # patch half-extent in [-1, 1] coordinates is `half`
        centre = rng.uniform(-1 + half, 1 - half, size=2)
        views = torch.stack([self.view(image, centre, half, rng) for _ in range(2)])
        return {"views": views.numpy()}  # (2, 3, P, P)

    def view(self, image: Tensor, centre: np.ndarray, half: float, rng: np.random.Generator) -> Tensor:
        c = self.cfg
        angle = math.radians(rng.uniform(-c.max_rotate, c.max_rotate))
        scale = half * rng.uniform(*c.scale_range)
        shift = centre + rng.uniform(-1, 1, size=2) * c.max_translate * 2 * half
        cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
        theta = torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]], dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 3, c.patch_size, c.patch_size], align_corners=False)
        patch = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)[0]  # (3, P, P)
        gain = torch.from_numpy(rng.uniform(1 - c.color_shift, 1 + c.color_shift, (3, 1, 1))).float()
        offset = torch.from_numpy(rng.uniform(-c.color_shift, c.color_shift, (3, 1, 1))).float()
        grey = patch.mean(0, keepdim=True)
        saturation = float(rng.uniform(1 - 2 * c.color_shift, 1 + 2 * c.color_shift))
        patch = grey + saturation * (patch - grey)
        return network_input((patch * gain + offset).clamp(0, 1), self.harmonize)


def spread(emb: Tensor) -> Tensor:
    """Mean squared distance between different rows of (B, D) unit vectors: 2 for random
    directions in many dimensions, 0 when every image is embedded at one point. A 0-dim
    tensor on emb's device (read at log time)."""
    b = emb.shape[0]
    emb = emb.detach()
    return torch.cdist(emb, emb).pow(2).sum() / (b * (b - 1))


def triplet_loss(anchor: Tensor, positive: Tensor, *, margin: float, negatives: str
                 ) -> tuple[Tensor, Tensor]:
    """(B, D) L2-normalised embeddings -> (loss, retrieval accuracy, a 0-dim tensor).
    Negatives: other rows."""
    b = anchor.shape[0]
    d_ap = torch.cdist(anchor, positive).pow(2)  # (B, B): anchor i vs every positive j
    d_aa = torch.cdist(anchor, anchor).pow(2)
    eye = torch.eye(b, dtype=torch.bool, device=anchor.device)
    d_pos = d_ap.diagonal()
    if negatives in ("hardest", "semihard"):
        candidates = torch.cat([d_ap.masked_fill(eye, math.inf), d_aa.masked_fill(eye, math.inf)], 1)
        d_neg = candidates.min(1).values  # (B,)
        if negatives == "semihard":
            outside = candidates.masked_fill(candidates <= d_pos[:, None], math.inf).min(1).values
            farthest = candidates.masked_fill(eye.repeat(1, 2), -math.inf).max(1).values
            d_neg = torch.where(torch.isfinite(outside), outside, farthest)
    else:
        other = (torch.arange(b, device=anchor.device) + torch.randint(1, b, (b,), device=anchor.device)) % b
        d_neg = d_ap[torch.arange(b, device=anchor.device), other]
    loss = F.relu(d_pos - d_neg + margin).mean()
    acc = (d_ap.argmin(1) == torch.arange(b, device=anchor.device)).float().mean()
    return loss, acc


class ExemplarHead(TaskHead):
    def __init__(self, *, in_ch: int, width: float, margin: float = 0.5,
                 negatives: str = "hardest", norm: str = "batch"):
        super().__init__()
        self.tower = patch_tower(in_ch=in_ch, width=width, norm=norm)
        self.margin, self.negatives = margin, negatives

    def embed(self, views: Tensor, features: Features) -> Tensor:
        # fp32 from here (autocast): the normalisation and the triplet distances
        return F.normalize(self.tower(features(views)).flatten(1).float(), dim=1)  # (N, D)

    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        views = batch["views"]  # (B, 2, 3, P, P)
        emb = self.embed(views.flatten(0, 1), features).view(views.shape[0], 2, -1)
        loss, acc = triplet_loss(emb[:, 0], emb[:, 1], margin=self.margin, negatives=self.negatives)
        return TaskOutput(loss=loss, metrics={"retrieval_acc": acc, "spread": spread(emb[:, 0])},
                          chance={"retrieval_acc": 1 / views.shape[0]})

    def collapse(self, metrics: dict[str, float]) -> str | None:
        if metrics["spread"] < COLLAPSED_SPREAD:
            return (f"embeddings collapsed: mean squared distance between images "
                    f"{metrics['spread']:.3f} (random directions: 2.0)")
        return None


TASK = TaskDef(
    name="exemplar",
    task_id=2,
    config_cls=ExemplarConfig,
    source="images",
    input_key="views",
    build_sampler=lambda cfg, trunk, harmonize: ExemplarSampler(cfg=cfg, harmonize=harmonize),
    build_head=lambda cfg, trunk: ExemplarHead(in_ch=trunk.channels, width=trunk.width,
                                               margin=cfg.margin, negatives=cfg.negatives,
                                               norm=trunk.norm),
    enabled_when_absent=True,
)
