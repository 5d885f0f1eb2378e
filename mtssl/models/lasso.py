"""How a head reads the trunk: naively (last block-3 unit) or through a lasso mix of all units."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def one_hot_alpha(n: int) -> Tensor:
    """The starting (and naive-mode) coefficient row over n units: one-hot on the last unit."""
    alpha = torch.zeros(n)
    alpha[-1] = 1.0
    return alpha


def l1_penalty(alpha: Tensor) -> Tensor:
    """The lasso term for one task's coefficient row."""
    return alpha.abs().sum()


def unit_coefficients(alpha: Tensor) -> Tensor:
    """alpha scaled to unit L2 norm: the coefficients a head actually reads.

    Every head normalises its input, so its loss cannot see the scale of alpha; with the raw
    row, L1 would be lowered for free by shrinking all of alpha. On the unit sphere L1 can only
    fall by concentrating the row on fewer units: |a|_1 = |alpha|_1 / |alpha|_2 >= 1, with 1
    exactly when one unit is read. [choice]: the paper leaves the parameterisation open."""
    return alpha / alpha.norm().clamp_min(1e-12)


class TapMix(nn.Module):
    """One task's read-out: sum_u alpha[u] * tap_u, or just the last tap in naive mode.

    alpha starts one-hot on the last unit, so a lasso net starts out as the naive net; the mix
    and the penalty use its unit-norm `coefficients()`. Used by pre-training (one per task) and
    by eval-only lasso (one for the probe).
    """

    def __init__(self, *, num_taps: int, mode: str = "lasso"):
        super().__init__()
        if mode not in ("lasso", "naive"):
            raise ValueError(f"mode must be 'lasso' or 'naive', got {mode!r}")
        self.mode = mode
        # Naive mode keeps no parameter at all, so its optimizer state and checkpoints hold none.
        self.alpha = nn.Parameter(one_hot_alpha(num_taps)) if mode == "lasso" else None

    def forward(self, taps: dict[str, Tensor]) -> Tensor:
        maps = list(taps.values())  # each (B, C, H, W), same shape
        coefficients = self.coefficients()
        if coefficients is None:
            return maps[-1]
        # One dtype for the taps and the coefficients: under autocast (trunk.precision: bf16)
        # taps can differ (a unit's output is bf16 or fp32 depending on its last op), and
        # tensordot, which autocast does not cast, refuses mixed inputs.
        dtype = maps[-1].dtype
        for m in maps:
            dtype = torch.promote_types(dtype, m.dtype)
        stacked = torch.stack([m.to(dtype) for m in maps], dim=0)  # (U, B, C, H, W)
        return torch.tensordot(coefficients.to(dtype), stacked, dims=1)  # (B, C, H, W)

    def coefficients(self) -> Tensor | None:
        return None if self.alpha is None else unit_coefficients(self.alpha)

    def penalty(self) -> Tensor | None:
        coefficients = self.coefficients()
        return None if coefficients is None else l1_penalty(coefficients)
