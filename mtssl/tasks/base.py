"""The interface between a task file and the trainer.

A task file defines its config section, a sampler (picklable, runs in DataLoader workers:
one source item + an RNG -> one training sample), a head (an nn.Module that reads trunk
features through a callable and returns a loss and pretext metrics), and ends with one
`TaskDef` (mtssl/task_registry.py): the rest of the system knows tasks only through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

# The sampler's contract belongs to the data stream that runs samplers.
from mtssl.data.stream import Sampler, SkipSample

# Defined torch-free beside the registry (config reads them); task files import them from here.
from mtssl.task_registry import TaskConfig, TaskDef

__all__ = ["Features", "Sampler", "SkipSample", "TaskConfig", "TaskDef", "TaskHead",
           "TaskOutput", "TrunkInfo", "feature_size"]

Features = Callable[[Tensor], Tensor]  # (N, 3, H, W) input -> (N, C, h, w) mixed trunk taps


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


class TaskHead(nn.Module):
    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        raise NotImplementedError

    def collapse(self, metrics: dict[str, float]) -> str | None:  # metrics read as floats
        """Why this head's output has collapsed (in words), judged from its metrics; None if
        it has not. Default: the head has no collapse mode of its own."""
        return None

    def calibrate(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """Estimate data statistics before training (e.g. the colour prior); default: none."""


def feature_size(pixels: int, stride: int) -> int:
    """Spatial size after `stride` worth of stride-2 stages (each rounds up, as padded convs do)."""
    while stride > 1:
        pixels, stride = -(-pixels // 2), stride // 2
    return pixels

