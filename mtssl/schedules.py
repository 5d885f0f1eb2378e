"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def lr_scale(step: int, *, max_steps: int, warmup_steps: int = 0, decay: str = "cosine",
             min_ratio: float = 0.0) -> float:
    """Multiplier on every task's base learning rate at `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}; expected 'constant' or 'cosine'")
