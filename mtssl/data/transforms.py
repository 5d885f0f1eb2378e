"""Small per-sample image operations shared by the task samplers (numpy/PIL/torch on CPU)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mtssl.colour import harmonized_input, rgb_input


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 or (H, W) float32 -> size (h, w), antialiased."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.float32)).resize((w, h), Image.BILINEAR))
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def to_tensor(img: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    # np.array copies: sources may hand out read-only (shared, cached) arrays.
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).div_(255.0)


def network_input(rgb: Tensor, harmonize: bool) -> Tensor:
    """(…, 3, H, W) in [0, 1] -> the trunk's input: Lab L x3 when harmonized, else RGB in [-1, 1]."""
    return harmonized_input(rgb) if harmonize else rgb_input(rgb)


def random_crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = size
    y = int(rng.integers(img.shape[0] - h + 1))
    x = int(rng.integers(img.shape[1] - w + 1))
    return img[y:y + h, x:x + w]
