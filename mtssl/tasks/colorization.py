"""Colorization (Zhang et al. 2016): predict each region's colour as a distribution over ab bins.

Sampler: colour images only (grayscale sources carry no target), resized and cropped to a
square; input is Lab L replicated x3, target the image's ab channels. Head: 2x2 conv and 1x1
conv (4096 ch, ReLU), 1x1 conv to the Q in-gamut bins. Loss: soft cross-entropy against the
targets soft-encoded over their nearest bins, rebalanced toward rare colours with weights from
the bin prior measured on the training data before step 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.colour import (
    SOFT_NEIGHBORS,
    SOFT_SIGMA,
    SoftEncoder,
    ab_bins,
    annealed_mean,
    bin_histogram,
    lab_to_rgb,
    rebalance_weights,
    rgb_to_lab,
    smoothed_prior,
)
from mtssl.data.images import is_grayscale
from mtssl.data.transforms import random_crop, resize, to_tensor
from mtssl.figures import display, save_grid
from mtssl.models.resnet_v2 import norm_layer, scaled
from mtssl.precision import full_precision
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


@dataclass(frozen=True)
class ColorizationConfig(TaskConfig):
    input_size: int = 256
    sigma: float = SOFT_SIGMA  # Gaussian of the soft-encoding, in ab units
    neighbors: int = SOFT_NEIGHBORS  # bins each target is spread over (mtssl.colour: paper 5, Zhang 10)
    rebalance_lambda: float = 0.5  # mix of the prior with uniform in the class weights
    prior_batches: int = 16  # batches drawn before step 0 to measure the bin prior
    head_width: int = 4096  # channels of the two conv layers (scaled by trunk width)

    def __post_init__(self):
        super().__post_init__()
        require(self.input_size >= 16, "input_size", f"must be >= 16, got {self.input_size}")
        require(self.sigma > 0, "sigma", f"must be > 0, got {self.sigma}")
        require(1 <= self.neighbors <= 32, "neighbors", f"must be in [1, 32], got {self.neighbors}")
        require(0 <= self.rebalance_lambda <= 1, "rebalance_lambda",
                f"must be in [0, 1], got {self.rebalance_lambda}")
        require(self.prior_batches >= 0, "prior_batches", f"must be >= 0, got {self.prior_batches}")


class ColorizationSampler:
    def __init__(self, *, cfg: ColorizationConfig):
        self.size = cfg.input_size

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        h, w = img.shape[:2]
        if min(h, w) < self.size // 2:
            raise SkipSample("too_small")
        # Short side to a random size in [S, 1.25 S], then a random S x S crop and flip.
        short = int(rng.integers(self.size, int(self.size * 1.25) + 1))
        s = short / min(h, w)
        img = resize(img, (max(short, round(h * s)), max(short, round(w * s))))
        if is_grayscale(img):  # checked after resizing: same answer, far fewer pixels
            raise SkipSample("grayscale")
        img = random_crop(img, (self.size, self.size), rng)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        lab = rgb_to_lab(to_tensor(img))  # (3, S, S)
        light = (lab[:1] / 50.0 - 1.0).expand(3, -1, -1)
        return {"image": light.numpy().copy(), "ab": lab[1:].numpy()}


class ColorizationHead(TaskHead):
    # Buffers (register_buffer), declared so that they type as tensors.
    bins: Tensor  # (Q, 2) ab bin centres
    prior: Tensor  # (Q,) smoothed bin prior
    class_weights: Tensor  # (Q,) rebalancing weights

    def __init__(self, *, in_ch: int, width: float, head_width: int = 4096,
                 sigma: float = SOFT_SIGMA, neighbors: int = SOFT_NEIGHBORS,
                 rebalance_lambda: float = 0.5, norm: str = "batch", output_stride: int = 8):
        super().__init__()
        self.output_stride = output_stride  # the regions targets and prior are counted over
        bins = ab_bins()
        mid = scaled(head_width, width)
        self.pre = nn.Sequential(norm_layer(norm, in_ch), nn.ReLU())
        self.conv1 = nn.Conv2d(in_ch, mid, 2)
        self.conv2 = nn.Conv2d(mid, mid, 1)
        self.classify = nn.Conv2d(mid, len(bins), 1)
        self.encoder = SoftEncoder(bins=bins, sigma=sigma, k=neighbors)
        self.rebalance_lambda = rebalance_lambda
        self.register_buffer("bins", bins)
        # Uniform until calibrated: a uniform prior gives weights of exactly 1.
        self.register_buffer("prior", torch.full((len(bins),), 1.0 / len(bins)))
        self.register_buffer("class_weights", torch.ones(len(bins)))

    def logits(self, image: Tensor, features: Features) -> Tensor:
        x = self.pre(features(image))  # (B, C, h, w)
        x = F.pad(x, (0, 1, 0, 1))  # the 2x2 conv then keeps the h x w grid
        x = F.relu(self.conv1(x))
        return self.classify(F.relu(self.conv2(x)))  # (B, Q, h, w)

    def targets(self, ab: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        region_ab = F.adaptive_avg_pool2d(ab, size)  # (B, 2, h, w): one colour per output region
        # ab comes from uint8 images, finite by construction: no check (a host-device sync).
        idx, weight = self.encoder.encode(region_ab, check_finite=False)  # (B, k, h, w) each
        return idx, weight

    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        logits = self.logits(batch["image"], features).float()  # the loss in fp32 (autocast)
        with full_precision(logits.device):  # the soft-encoded targets too
            h, w = logits.shape[-2:]
            idx, weight = self.targets(batch["ab"].float(), (h, w))
        logp = F.log_softmax(logits, dim=1)
        cross = -(weight * logp.gather(1, idx)).sum(1)  # (B, h, w) soft cross-entropy
        rebalance = self.class_weights[idx[:, 0]]  # weight of each region's nearest bin
        loss = (rebalance * cross).mean()
        return TaskOutput(loss=loss, **self.scores(logits, idx, weight, rebalance, loss))

    @torch.no_grad()
    def scores(self, logits: Tensor, idx: Tensor, weight: Tensor, rebalance: Tensor,
               loss: Tensor) -> dict:
        """Pretext metrics and their chance levels.

        Primary: `skill`, 1 - loss / (the loss of the best constant answer), the rebalanced
        soft cross-entropy against that of one colour distribution predicted everywhere (the
        target mass of this batch, rebalanced): 0 at chance, 1 for a perfect prediction. Bin
        accuracies do not show early learning: the rebalanced loss pushes predictions away
        from the common greys, so plain accuracy sits below "always grey" for long (measured,
        docs/experiments.md). Also reported: plain and class-rebalanced (Zhang et al. 2016,
        sec. 3.1) accuracy of the most likely bin."""
        true = idx[:, 0]  # (B, h, w) nearest bin
        mass = torch.zeros(len(self.bins), device=logits.device).index_add_(
            0, idx.flatten(), (weight * rebalance[:, None]).flatten())
        log_const = (mass / mass.sum()).clamp_min(1e-12).log()  # (Q,)
        const = (rebalance * -(weight * log_const[idx]).sum(1)).mean()
        hit = (logits.argmax(1) == true).float()
        # 0-dim tensors on the device, read at log time (no host sync in the step)
        return {"metrics": {"skill": 1 - loss.detach() / const,
                            "rebalanced_acc": (rebalance * hit).sum() / rebalance.sum(),
                            "acc": hit.mean()},
                "chance": {"skill": 0.0}}

    @torch.no_grad()
    def calibrate(self, batches: Iterable[dict[str, Tensor]]) -> None:
        counts = torch.zeros(len(self.bins), device=self.bins.device)
        for batch in batches:
            # The prior and its weights are counted on what they weight: the per-region targets.
            h, w = batch["ab"].shape[-2:]
            size = (feature_size(h, self.output_stride), feature_size(w, self.output_stride))
            region_ab = F.adaptive_avg_pool2d(batch["ab"], size)
            counts += bin_histogram(self.encoder.nearest(region_ab), len(self.bins)).to(counts)
        if counts.sum() == 0:
            return
        self.prior.copy_(smoothed_prior(counts, self.bins))
        self.class_weights.copy_(rebalance_weights(self.prior, self.rebalance_lambda))

    @torch.no_grad()
    def colorize(self, image: Tensor, features: Features, temperature: float = 0.38) -> Tensor:
        """(B, 3, S, S) L-input -> (B, 3, S, S) RGB in [0, 1] from the annealed-mean colour."""
        probs = F.softmax(self.logits(image, features), dim=1)
        ab = F.interpolate(annealed_mean(probs, self.bins, temperature), size=image.shape[-2:],
                           mode="bilinear", align_corners=False)
        light = (image[:, :1] + 1.0) * 50.0
        return lab_to_rgb(torch.cat([light, ab], dim=1))


def build_head(cfg: ColorizationConfig, trunk: TrunkInfo) -> ColorizationHead:
    return ColorizationHead(in_ch=trunk.channels, width=trunk.width, head_width=cfg.head_width,
                            sigma=cfg.sigma, neighbors=cfg.neighbors,
                            rebalance_lambda=cfg.rebalance_lambda, norm=trunk.norm,
                            output_stride=trunk.output_stride)


def report(model, batch: dict[str, Tensor], out: Path, cfg) -> list[str]:
    """Colorized held-out samples next to their inputs and originals."""
    n = min(4, len(batch["image"]))
    pred = model.heads["colorization"].colorize(
        batch["image"][:n], lambda x: model.features("colorization", x))
    light = (batch["image"][:n, :1] + 1.0) * 50.0
    truth = lab_to_rgb(torch.cat([light, batch["ab"][:n]], dim=1))
    rows = [[display(batch["image"][i]), pred[i].permute(1, 2, 0).numpy(),
             truth[i].permute(1, 2, 0).numpy()] for i in range(n)]
    save_grid(rows, ["input (L)", "colorized", "original"], out / "colorization.png")
    return ["## Colorization", "", "![colorized samples](colorization.png)", ""]


TASK = TaskDef(
    name="colorization",
    task_id=1,
    config_cls=ColorizationConfig,
    source="images",
    input_key="image",
    build_sampler=lambda cfg, trunk, harmonize: ColorizationSampler(cfg=cfg),
    build_head=build_head,
    calibration_batches=lambda cfg: cfg.prior_batches,
    harmonize=True,
    harmonize_required="colorization always sees L replicated x3 (its input is the grayscale "
                       "image)",
    enabled_when_absent=True,
    report=report,
)
