"""A fifth task that lives in the test suite only: was the image flipped upside down?

Proves a task is one file: importing this module registers it (as a config's
`task_modules: [toy_task]` does in every process of a run); nothing in mtssl names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.data.transforms import network_input, resize, to_tensor
from mtssl.task_registry import register
from mtssl.tasks.base import Features, TaskConfig, TaskDef, TaskHead, TaskOutput
from mtssl.validation import require


@dataclass(frozen=True)
class FlipConfig(TaskConfig):
    image_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")


class FlipSampler:
    def __init__(self, cfg: FlipConfig, harmonize: bool):
        self.cfg, self.harmonize = cfg, harmonize

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = resize(image, (self.cfg.image_size, self.cfg.image_size))
        flipped = rng.random() < 0.5
        if flipped:
            image = image[::-1]
        return {"image": network_input(to_tensor(image), self.harmonize).numpy(),
                "flipped": np.float32(flipped)}


class FlipHead(TaskHead):
    def __init__(self, in_ch: int):
        super().__init__()
        self.fc = nn.Linear(in_ch, 1)

    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        logits = self.fc(features(batch["image"]).mean(dim=(2, 3)))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, batch["flipped"])
        acc = ((logits > 0).float() == batch["flipped"]).float().mean().item()
        share = batch["flipped"].mean().item()
        return TaskOutput(loss=loss, metrics={"acc": acc}, chance={"acc": max(share, 1 - share)})


def report(model, batch: dict[str, Tensor], out: Path, cfg) -> list[str]:
    return ["## Flip", "", f"{len(batch['image'])} held-out images.", ""]


TASK = TaskDef(
    name="toy",
    task_id=4,
    config_cls=FlipConfig,
    source="images",
    input_key="image",
    build_sampler=lambda cfg, trunk, harmonize: FlipSampler(cfg, harmonize),
    build_head=lambda cfg, trunk: FlipHead(trunk.channels),
    report=report,
)

register(TASK)
