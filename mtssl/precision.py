"""Mixed precision of the training step: `trunk.precision` in the config.

bf16 runs the trunk's and heads' forward under `torch.autocast` (matrix products and
convolutions in bfloat16, parameters and optimizer state stay float32); heads compute their
losses and targets in float32. It works on the CPU too (slowly: a CPU without bf16 units
emulates it), so tests exercise the same code path as a GPU run.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str):
    """Context for a forward pass at `precision` ('fp32': no autocast) on `device`."""
    if precision == "fp32":
        return nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision must be 'fp32' or one of {sorted(DTYPES)}, got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def full_precision(device: torch.device | str):
    """Inside an autocast region: compute in float32 (losses, targets)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
