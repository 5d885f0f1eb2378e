"""Image grids for the reports (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_grid(rows: list[list[np.ndarray]], titles: list[str], out: Path) -> None:
    """rows of (H, W, 3) or (H, W) images in [0, 1]; one column per title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.4 * len(titles), 2.2 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.axis("off")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def display(x: torch.Tensor) -> np.ndarray:
    """A network input (3, H, W) in [-1, 1] (RGB or replicated L) -> (H, W, 3) in [0, 1]."""
    return ((x.permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0).clip(0, 1)
