"""The interface between a task file and the trainer.

A task file defines its config section, a sampler (picklable, runs in DataLoader workers:
one source item + an RNG -> one training sample), a head (an nn.Module that reads trunk
features through a callable and returns a loss and pretext metrics), and ends with one
`TaskDef` that the trainer uses. The trainer knows tasks only through `TaskDef`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from mtssl.validation import require

Features = Callable[[Tensor], Tensor]  # (N, 3, H, W) input -> (N, C, h, w) mixed trunk taps


@dataclass(frozen=True)
class TaskConfig:
    """Fields every task section has; task files subclass it with their own."""
    enabled: bool = True
    weight: float = 1.0  # multiplies the task's loss
    lr: float = 1e-4  # base learning rate of the task's RMSProp (1e-3 measured destructive)
    batch_size: int = 8  # per step, over all of the task's workers together
    workers: int = 1  # distributed: processes (pods) computing this task's gradients

    def __post_init__(self):
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        require(self.batch_size % self.workers == 0, "batch_size",
                f"must split evenly over {self.workers} workers, got {self.batch_size}")
        require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrunkInfo:
    """What heads and samplers may know about the trunk: never its modules."""
    channels: int  # channels of every block-3 tap
    width: float  # the width multiplier, so heads scale with the trunk
    output_stride: int
    norm: str  # 'batch' or 'group': heads use the same normalisation as the trunk


@dataclass
class TaskOutput:
    loss: Tensor  # scalar, already averaged over the batch
    # The pretext metric(s), e.g. {"acc": 0.62}: 0-dim tensors on the loss's device, so the
    # training step never waits for the device; readers convert (float()) when they log.
    metrics: dict[str, Tensor]
    # The head's primary pretext metric as a trivial predictor reaches it on this same batch
    # (uniform guess, most frequent class, all pixels moving, ...): {"acc": 0.125}; a float or
    # a 0-dim tensor.
    chance: dict[str, float | Tensor] = field(default_factory=dict)


class SkipSample(Exception):
    """A source item this task cannot use (too small, no colour, ...): counted, then redrawn."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


Sampler = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


class TaskHead(nn.Module):
    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        raise NotImplementedError

    def collapse(self, metrics: dict[str, float]) -> str | None:  # metrics read as floats
        """Why this head's output has collapsed (in words), judged from its metrics; None if
        it has not. Default: the head has no collapse mode of its own."""
        return None

    def calibrate(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """Estimate data statistics before training (e.g. the colour prior); default: none."""


@dataclass(frozen=True)
class TaskDef:
    name: str
    config_cls: type[TaskConfig]
    source: Literal["images", "frames"]  # images: RGB arrays; frames: (frame, motion mask) pairs
    build_sampler: Callable[..., Sampler]  # (cfg, trunk: TrunkInfo, harmonize: bool) -> Sampler
    build_head: Callable[..., TaskHead]  # (cfg, trunk: TrunkInfo) -> TaskHead
    # (cfg) -> batches drawn for TaskHead.calibrate before step 0
    calibration_batches: Callable[..., int] = lambda cfg: 0


def feature_size(pixels: int, stride: int) -> int:
    """Spatial size after `stride` worth of stride-2 stages (each rounds up, as padded convs do)."""
    while stride > 1:
        pixels, stride = -(-pixels // 2), stride // 2
    return pixels

