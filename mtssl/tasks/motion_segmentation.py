"""Motion segmentation (Pathak et al. 2017): from one frame, which pixels will move?

Sampler: a video frame and its motion mask (computed from the video by `mtssl prep`, or
given beside the frames), resized to the task's frame size, randomly flipped. Head: two 1x1
convs (4096 ch, ReLU) and a 1x1 conv to one logit per position. Loss: binary cross-entropy
against the fraction of moving pixels in each output region.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssl.data.transforms import network_input, resize, to_tensor
from mtssl.figures import display, save_grid
from mtssl.models.resnet_v2 import norm_layer, scaled
from mtssl.tasks.base import Features, SkipSample, TaskConfig, TaskDef, TaskHead, TaskOutput
from mtssl.validation import require


@dataclass(frozen=True)
class MotionSegmentationConfig(TaskConfig):
    frame_size: tuple[int, int] = (240, 320)  # (height, width)
    head_width: int = 4096
    max_upscale: float = 2.0  # frames needing more enlargement than this are skipped as too small

    def __post_init__(self):
        super().__post_init__()
        require(min(self.frame_size) >= 16, "frame_size", f"sides must be >= 16, got {self.frame_size}")
        require(self.max_upscale >= 1.0, "max_upscale", f"must be >= 1, got {self.max_upscale}")


class MotionSampler:
    def __init__(self, *, cfg: MotionSegmentationConfig, harmonize: bool):
        self.cfg, self.harmonize = cfg, harmonize

    def __call__(self, item: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        frame, mask = item  # (H, W, 3) uint8, (H, W) float in [0, 1]
        h, w = self.cfg.frame_size
        if max(h / frame.shape[0], w / frame.shape[1]) > self.cfg.max_upscale:
            raise SkipSample("too_small")
        frame, mask = resize(frame, (h, w)), resize(mask.astype(np.float32), (h, w))
        if rng.random() < 0.5:
            frame, mask = frame[:, ::-1], mask[:, ::-1]
        x = network_input(to_tensor(frame), self.harmonize)
        return {"frame": x.numpy(), "mask": np.ascontiguousarray(mask, dtype=np.float32)[None]}


class MotionSegmentationHead(TaskHead):
    def __init__(self, *, in_ch: int, width: float, head_width: int = 4096, norm: str = "batch"):
        super().__init__()
        mid = scaled(head_width, width)
        self.body = nn.Sequential(
            norm_layer(norm, in_ch), nn.ReLU(),
            nn.Conv2d(in_ch, mid, 1), nn.ReLU(),
            nn.Conv2d(mid, mid, 1), nn.ReLU(),
            nn.Conv2d(mid, 1, 1),
        )

    def logits(self, frame: Tensor, features: Features) -> Tensor:
        return self.body(features(frame))  # (B, 1, h, w)

    def forward(self, batch: dict[str, Tensor], features: Features) -> TaskOutput:
        logits = self.logits(batch["frame"], features).float()  # the loss in fp32 (autocast)
        h, w = logits.shape[-2:]
        target = F.adaptive_avg_pool2d(batch["mask"].float(), (h, w))  # (B, 1, h, w) in [0, 1]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        # Metrics as 0-dim tensors on the device, read at log time (no host sync in the step).
        pred, true = logits.detach() > 0, target > 0.5
        union = (pred | true).sum()
        iou = torch.where(union > 0, (pred & true).sum() / union.clamp_min(1), 1.0)
        # Chance: the better of two constant answers, "everything moves" and "nothing moves".
        moving = true.float().mean()
        return TaskOutput(loss=loss, metrics={"iou": iou},
                          chance={"iou": torch.where(moving > 0, moving, 1.0)})

    @torch.no_grad()
    def predict(self, frame: Tensor, features: Features) -> Tensor:
        """(B, 3, H, W) -> (B, 1, H, W) probability that each pixel moves."""
        logits = self.logits(frame, features)
        return torch.sigmoid(F.interpolate(logits, size=frame.shape[-2:], mode="bilinear",
                                           align_corners=False))


def report(model, batch: dict[str, Tensor], out: Path, cfg) -> list[str]:
    """Predicted motion masks of held-out frames next to the true ones."""
    n = min(4, len(batch["frame"]))
    prob = model.heads["motion_segmentation"].predict(
        batch["frame"][:n], lambda x: model.features("motion_segmentation", x))
    rows = [[display(batch["frame"][i]), batch["mask"][i, 0].numpy(), prob[i, 0].numpy()]
            for i in range(n)]
    save_grid(rows, ["frame", "true mask", "predicted P(moves)"], out / "motion.png")
    source = "synthetic clips (embedded default)" if cfg.data.frames == "embedded" else cfg.data.frames
    return ["## Motion segmentation", "", f"Frames from {source}.", "",
            "![predicted motion masks](motion.png)", ""]


TASK = TaskDef(
    name="motion_segmentation",
    task_id=3,
    config_cls=MotionSegmentationConfig,
    source="frames",
    input_key="frame",
    build_sampler=lambda cfg, trunk, harmonize: MotionSampler(cfg=cfg, harmonize=harmonize),
    build_head=lambda cfg, trunk: MotionSegmentationHead(in_ch=trunk.channels, width=trunk.width,
                                                         head_width=cfg.head_width, norm=trunk.norm),
    enabled_when_absent=True,
    report=report,
)
