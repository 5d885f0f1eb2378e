"""PASCAL VOC detection: torchvision's Faster R-CNN in the C4 design, fine-tuned; VOC07
11-point mAP at IoU 0.5 and the per-class AP.

The backbone is our trunk through block 3 (optionally read through an eval-only lasso mix);
RoIAlign crops 14x14 from it and a freshly initialised ResNet-v2 block 4 (first unit stride 2,
then final norm + ReLU and average pooling) is the box head.

Data: the VOC devkit layout, `JPEGImages/`, `Annotations/<id>.xml`, `ImageSets/Main/<split>.txt`.
VOC boxes are 1-based inclusive pixel indices; they become continuous (xmin - 1, ymin - 1,
xmax, ymax). Difficult objects are left out of training and ignored by the evaluation.
Annotations that are missing or malformed, and images that are missing or unreadable, are
skipped and counted.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mtssl.data.images import BadImage, load_rgb
from mtssl.data.transforms import to_tensor
from mtssl.eval.common import (
    EvalError,
    LoadedTrunk,
    freeze_batch_norm,
    model_input,
    result_header,
    training_order,
)
from mtssl.eval.metrics import detection_map
from mtssl.models.lasso import TapMix
from mtssl.models.resnet_v2 import PreActBottleneck, norm_layer, scaled
from mtssl.validation import require

log = logging.getLogger("mtssl.eval.pascal")


@dataclass(frozen=True)
class DetectionSettings:
    """Defaults are the `paper` settings: [choice] the VOC07 recipe of Ren et al. 2015 (one image
    per step, lr 1e-3 for 60K steps then 1e-4 for 20K, 128 RoIs per image), trainval -> test."""
    train_split: str = "trainval"
    test_split: str = "test"
    classes: tuple[str, ...] | None = None  # null: every class named in the training split
    min_size: int = 600  # shorter image side fed to the detector
    max_size: int = 1000
    input: Literal["rgb", "gray"] = "rgb"
    output_stride: Literal[8, 16] | None = 16  # C4: block-3 features at stride 16
    block4_units: int = 3
    lasso: bool = False  # eval-only lasso over the block-3 units
    lasso_l1: float = 1e-3
    freeze_norm: bool = True  # keep a pre-trained trunk's batch-norm statistics and affine fixed
    anchor_sizes: tuple[int, ...] = (128, 256, 512)
    rpn_pre_nms_train: int = 12000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 300
    rois_per_image: int = 128
    score_thresh: float = 0.001
    iterations: int = 80000
    batch_size: int = 1  # images per step
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (60000,)  # lr x 0.1 at each
    warmup: int = 0  # linear warm-up steps
    momentum: float = 0.9
    weight_decay: float = 5e-4
    hflip: bool = True
    max_train_images: int | None = None
    max_test_images: int | None = None
    workers: int = 4
    seed: int = 0

    def __post_init__(self):
        require(16 <= self.min_size <= self.max_size, "min_size",
                f"must be in [16, max_size], got {self.min_size}")
        for key in ("block4_units", "iterations", "batch_size", "rois_per_image"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(len(self.anchor_sizes) >= 1, "anchor_sizes", "needs at least one size")
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


SETTINGS = DetectionSettings
PRESETS = {"paper": {},
           "smoke": {"train_split": "train", "min_size": 128, "max_size": 192,
                     "block4_units": 1, "anchor_sizes": [16, 32, 64, 128],
                     "rpn_pre_nms_train": 300, "rpn_post_nms_train": 100,
                     "rpn_pre_nms_test": 150, "rpn_post_nms_test": 30, "rois_per_image": 32,
                     "iterations": 20, "batch_size": 2, "lr": 0.01, "lr_steps": [],
                     "warmup": 5, "workers": 0}}


# --- annotations -----------------------------------------------------------------------------

class AnnotationError(ValueError):
    """A VOC annotation file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class VOCObject:
    name: str
    box: tuple[float, float, float, float]  # continuous (x0, y0, x1, y1)
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VOCAnnotation:
    filename: str
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def _text(node: ET.Element, path: str, where: str) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise AnnotationError(f"{where}: missing <{path}>")
    return found.text.strip()


def _number(node: ET.Element, path: str, where: str) -> float:
    text = _text(node, path, where)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{where}: <{path}> is not a number: {text!r}") from None


def _flag(node: ET.Element, tag: str, where: str) -> bool:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        return False
    if found.text.strip() not in ("0", "1"):
        raise AnnotationError(f"{where}: <{tag}> must be 0 or 1, got {found.text.strip()!r}")
    return found.text.strip() == "1"


def parse_voc_xml(source: str | Path | bytes, *, name: str | None = None) -> VOCAnnotation:
    """One VOC annotation (file path or XML bytes/text); AnnotationError names what is wrong."""
    where = name or (str(source) if isinstance(source, Path) else "<annotation>")
    try:
        root = ET.parse(source).getroot() if isinstance(source, Path) else ET.fromstring(source)
    except (ET.ParseError, OSError) as err:
        raise AnnotationError(f"{where}: not valid XML ({err})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{where}: root element is <{root.tag}>, expected <annotation>")
    width = int(_number(root, "size/width", where))
    height = int(_number(root, "size/height", where))
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{where}: image size {width}x{height} is not positive")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        at = f"{where} object {i + 1}"
        x0, y0 = _number(obj, "bndbox/xmin", at) - 1, _number(obj, "bndbox/ymin", at) - 1
        x1, y1 = _number(obj, "bndbox/xmax", at), _number(obj, "bndbox/ymax", at)
        x0, x1 = max(0.0, x0), min(float(width), x1)
        y0, y1 = max(0.0, y0), min(float(height), y1)
        if x1 <= x0 or y1 <= y0:
            raise AnnotationError(f"{at}: empty box after clipping to the image: "
                                  f"({x0}, {y0}, {x1}, {y1})")
        objects.append(VOCObject(name=_text(obj, "name", at), box=(x0, y0, x1, y1),
                                 difficult=_flag(obj, "difficult", at),
                                 truncated=_flag(obj, "truncated", at)))
    return VOCAnnotation(filename=_text(root, "filename", where), width=width, height=height,
                         objects=tuple(objects))


def load_split(root: Path, split: str, limit: int | None
               ) -> tuple[list[tuple[str, Path, VOCAnnotation]], list[tuple[str, str]]]:
    """(id, image path, annotation) of a split, and (item, reason) for what was skipped."""
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise EvalError(f"{listing}: missing; splits present: {have or 'none'} (expected the VOC "
                        "layout JPEGImages/, Annotations/, ImageSets/Main/<split>.txt)")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    samples, problems = [], []
    for image_id in ids[:limit] if limit else ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            problems.append((str(xml), "missing_annotation"))
            continue
        try:
            ann = parse_voc_xml(xml)
        except AnnotationError as err:
            log.warning("skipped: %s", err)
            problems.append((str(xml), "bad_annotation"))
            continue
        image = next((p for p in (root / "JPEGImages" / ann.filename,
                                  root / "JPEGImages" / f"{image_id}.jpg") if p.is_file()), None)
        if image is None:
            log.warning("skipped %s: its image %s is missing", xml, ann.filename)
            problems.append((str(xml), "missing_image"))
            continue
        samples.append((image_id, image, ann))
    if not samples:
        raise EvalError(f"{listing}: no usable sample ({dict(Counter(r for _, r in problems))})")
    return samples, problems


class DetectionDataset(torch.utils.data.Dataset):
    """(image in [0, 1], target) per (sample index, flip) pair; None for unreadable images."""

    def __init__(self, samples, order: list[tuple[int, bool]], classes: list[str]):
        self.samples, self.order, self.classes = samples, order, classes

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        index, flip = self.order[i]
        image_id, path, ann = self.samples[index]
        try:
            img = to_tensor(load_rgb(path))  # (3, H, W)
        except BadImage as err:
            return index, None, None, err.reason
        kept = [o for o in ann.objects if not o.difficult and o.name in self.classes]
        boxes = torch.tensor([o.box for o in kept], dtype=torch.float32).reshape(-1, 4)
        # Scale to the decoded size in case the annotation's size field disagrees with the file.
        sx, sy = img.shape[2] / ann.width, img.shape[1] / ann.height
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        if flip:
            img = img.flip(-1)
            boxes = torch.stack([img.shape[2] - boxes[:, 2], boxes[:, 1],
                                 img.shape[2] - boxes[:, 0], boxes[:, 3]], 1)
        labels = torch.tensor([self.classes.index(o.name) + 1 for o in kept], dtype=torch.int64)
        return index, img, {"boxes": boxes, "labels": labels}, ""


# --- the detector ----------------------------------------------------------------------------

class C4Backbone(nn.Module):
    """Trunk through block 3 on the detector's normalised input ([-1, 1] RGB)."""

    def __init__(self, trunk: nn.Module, *, input_mode: str, lasso: bool):
        super().__init__()
        self.trunk, self.input_mode = trunk, input_mode
        self.mix = TapMix(num_taps=len(trunk.tap_names), mode="lasso" if lasso else "naive")
        self.out_channels = trunk.out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # (B, 3, H, W) -> {"0": (B, C, h, w)}
        return {"0": self.mix(self.trunk(model_input((x + 1) / 2, self.input_mode)).taps)}


class C4BoxHead(nn.Module):
    """A fresh ResNet-v2 block 4 on RoI crops: (R, C3, 14, 14) -> (R, C4)."""

    def __init__(self, *, in_ch: int, width: float, units: int, norm: str):
        super().__init__()
        out_ch, mid_ch = scaled(2048, width), scaled(512, width)
        self.units = nn.Sequential(*[
            PreActBottleneck(in_ch=in_ch if u == 0 else out_ch, out_ch=out_ch, mid_ch=mid_ch,
                             stride=2 if u == 0 else 1, norm=norm) for u in range(units)])
        self.norm = norm_layer(norm, out_ch)  # v2 units are pre-activated: close the block
        self.out_channels = out_ch

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.units(x))).mean(dim=(2, 3))


def build_detector(loaded: LoadedTrunk, *, num_classes: int, s: DetectionSettings) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = C4Backbone(loaded.build(s.output_stride), input_mode=s.input, lasso=s.lasso)
    head = C4BoxHead(in_ch=backbone.out_channels, width=loaded.arch.width,
                     units=s.block4_units, norm=loaded.arch.norm)
    return FasterRCNN(
        backbone, min_size=s.min_size, max_size=s.max_size,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,  # [0, 1] -> [-1, 1], the trunk's range
        rpn_anchor_generator=AnchorGenerator(sizes=(tuple(s.anchor_sizes),),
                                             aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_train=s.rpn_pre_nms_train, rpn_post_nms_top_n_train=s.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=s.rpn_pre_nms_test, rpn_post_nms_top_n_test=s.rpn_post_nms_test,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2),
        box_head=head, box_predictor=FastRCNNPredictor(head.out_channels, num_classes + 1),
        box_batch_size_per_image=s.rois_per_image, box_score_thresh=s.score_thresh)


def lr_factor(it: int, s: DetectionSettings) -> float:
    warm = min(1.0, (it + 1) / s.warmup) if s.warmup else 1.0
    return warm * 0.1 ** sum(it >= step for step in s.lr_steps)


def collate(batch):
    return batch


def fine_tune(model: nn.Module, samples, classes: list[str], s: DetectionSettings, *,
              freeze: bool, device: torch.device) -> tuple[list[float], Counter]:
    """SGD on the training split; returns the per-step losses and skipped-image reasons."""
    order = training_order(len(samples), s.iterations * s.batch_size, hflip=s.hflip, seed=s.seed)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(samples, order, classes),
        batch_size=s.batch_size, num_workers=s.workers, collate_fn=collate)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "mix." not in n]
    alpha = [p for n, p in model.named_parameters() if "mix." in n]
    model.to(device).train()
    if freeze:
        freeze_batch_norm(model.backbone.trunk)
        params = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD([{"params": params, "weight_decay": s.weight_decay},
                           {"params": alpha, "weight_decay": 0.0}], lr=s.lr, momentum=s.momentum)
    losses, skipped = [], Counter()
    for it, batch in enumerate(loader):
        good = [(img, tgt) for _, img, tgt, why in batch if not why]
        skipped.update(why for *_, why in batch if why)
        if not good:
            continue
        for group in opt.param_groups:
            group["lr"] = s.lr * lr_factor(it, s)
        parts = model([img.to(device) for img, _ in good],
                      [{k: v.to(device) for k, v in t.items()} for _, t in good])
        loss = sum(parts.values())
        penalty = model.backbone.mix.penalty()
        if penalty is not None:
            loss = loss + s.lasso_l1 * penalty
        if not torch.isfinite(loss):
            raise EvalError(f"detection fine-tuning diverged at step {it} (loss {loss.item()}); "
                            "lower lr or raise warmup")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, skipped


@torch.no_grad()
def evaluate(model: nn.Module, samples, classes: list[str], s: DetectionSettings, *,
             device: torch.device) -> tuple[float, dict[str, float], Counter]:
    model.eval()
    loader = torch.utils.data.DataLoader(
        DetectionDataset(samples, [(i, False) for i in range(len(samples))], classes),
        batch_size=s.batch_size, num_workers=s.workers, collate_fn=collate)
    dets = {c: [] for c in classes}
    skipped, seen = Counter(), []
    for batch in loader:
        good = [(i, img) for i, img, _, why in batch if not why]
        skipped.update(why for *_, why in batch if why)
        seen += [i for i, _ in good]
        if not good:
            continue
        outputs = model([img.to(device) for _, img in good])
        for (i, img), out in zip(good, outputs):
            ann = samples[i][2]  # back to annotation coordinates, should the sizes disagree
            scale = np.array([ann.width / img.shape[2], ann.height / img.shape[1]] * 2)
            for box, label, score in zip(out["boxes"].cpu().numpy(), out["labels"].tolist(),
                                         out["scores"].tolist()):
                dets[classes[label - 1]].append((i, score, box * scale))
    # Unreadable test images were skipped: their boxes count neither as found nor as missed.
    gts = {c: {} for c in classes}
    for i in seen:
        for c in classes:
            objs = [o for o in samples[i][2].objects if o.name == c]
            if objs:
                gts[c][i] = (np.array([o.box for o in objs], np.float64),
                             np.array([o.difficult for o in objs], bool))
    mean_ap, per_class = detection_map(dets, gts)
    return mean_ap, per_class, skipped


def run(loaded: LoadedTrunk, data: Path, s: DetectionSettings, *, settings_name: str = "custom",
        device: torch.device = torch.device("cpu")) -> dict:
    """Fine-tune the C4 detector on the training split; VOC07 mAP on the test split."""
    start = time.perf_counter()
    data = Path(data)
    train, train_problems = load_split(data, s.train_split, s.max_train_images)
    test, test_problems = load_split(data, s.test_split, s.max_test_images)
    classes = list(s.classes) if s.classes else sorted({o.name for _, _, a in train
                                                        for o in a.objects})
    if not classes:
        raise EvalError(f"{data}: the {s.train_split} split has no annotated object")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = build_detector(loaded, num_classes=len(classes), s=s)
    losses, train_skipped = fine_tune(model, train, classes, s,
                                      freeze=s.freeze_norm and not loaded.is_random, device=device)
    mean_ap, per_class, test_skipped = evaluate(model, test, classes, s, device=device)
    problems = Counter(r for _, r in train_problems + test_problems)
    alpha = model.backbone.mix.coefficients()
    return {**result_header(loaded, "pascal", settings_name, s, data),
            "metrics": {"mAP": mean_ap}, "per_class_ap": per_class, "classes": classes,
            "train_images": len(train), "test_images": len(test),
            "skipped": dict(problems + train_skipped + test_skipped),
            "skipped_items": (train_problems + test_problems)[:50],
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "alpha": None if alpha is None else alpha.detach().tolist(),
            "seconds": time.perf_counter() - start}
