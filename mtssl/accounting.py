"""Device-time accounting: device-seconds per task, the GPU-hour budget, milestone names.

Every process counts the devices it holds times the wall seconds it holds them while training
(a GPU process one `gpu` device, a CPU process one `cpu` device). Time spent on one task's
gradients goes to that task; time a process spends for all tasks (the optimizer step,
checkpoints) goes to SHARED. Budget and milestones count the devices that train: the single
process's, or in a distributed run the workers'. The distributed coordinator holds no
accelerator: its time is exported as CPU time (metric label device_type=cpu) and never counted
as GPU-hours. A run whose workers are CPU processes (the cpu-small profile) counts their CPU
device-hours against `budget.gpu_hours`, its stand-in for GPU-hours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

SHARED = "shared"  # device time not attributable to one task
SECONDS_PER_HOUR = 3600.0


def device_type(device_kind: str) -> str:
    """'gpu' for a CUDA device, else 'cpu' (the metric label)."""
    return "gpu" if device_kind == "cuda" else "cpu"


class DeviceClock:
    """Device-seconds since the previous lap: wall seconds times the devices held."""

    def __init__(self, *, devices: int = 1, clock: Callable[[], float] = time.perf_counter):
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        self.devices, self.clock = devices, clock
        self.last = clock()

    def lap(self) -> float:
        now = self.clock()
        spent, self.last = (now - self.last) * self.devices, now
        return spent


def milestone_decimals(every_hours: float) -> int:
    """Decimals that name every multiple of `every_hours` distinctly (at least 2, at most 6)."""
    for d in range(2, 7):
        if abs(round(every_hours, d) - every_hours) < 1e-12:
            return d
    return 6


def milestone_name(hours: float, *, every_hours: float) -> str:
    """Checkpoint milestone name of a device-hour mark, e.g. 0.5 -> 'gpuh_0000.50'."""
    d = milestone_decimals(every_hours)
    return f"gpuh_{hours:0{5 + d}.{d}f}"


def crossed_marks(before_hours: float, after_hours: float, *, every_hours: float) -> list[float]:
    """Multiples of `every_hours` in (before, after]: the milestones a step passed."""
    first = math.floor(before_hours / every_hours + 1e-9) + 1
    last = math.floor(after_hours / every_hours + 1e-9)
    return [k * every_hours for k in range(first, last + 1)]


def budget_check(before_s: float, after_s: float, *, budget_hours: float | None,
                 every_hours: float | None) -> tuple[list[str], bool]:
    """(milestone names passed, budget exhausted) when total device-seconds go before -> after."""
    before, after = before_s / SECONDS_PER_HOUR, after_s / SECONDS_PER_HOUR
    names = ([milestone_name(h, every_hours=every_hours)
              for h in crossed_marks(before, after, every_hours=every_hours)]
             if every_hours else [])
    return names, budget_hours is not None and after >= budget_hours


def remaining_hours(budget_hours: float | None, used_hours: float) -> float | None:
    return None if budget_hours is None else max(0.0, budget_hours - used_hours)
