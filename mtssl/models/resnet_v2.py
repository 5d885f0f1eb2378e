"""Pre-activation ResNet-v2 trunk, kept up to the end of block 3, with named taps.

Every unit of block 3 is a tap: lasso mixing, heads and evaluations read taps and never reach
into the trunk. The output stride is one knob: once the running stride reaches it, later
strides turn into dilation, so the parameters are the same at stride 8 and 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtssl.config import DEPTH_UNITS  # owned by the config, which validates `trunk.depth`

BLOCK_CHANNELS = (256, 512, 1024)  # output channels of blocks 1-3 at width 1
BLOCK_STRIDES = (1, 2, 2)  # the root already brings the stride to 4


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier, at least 4 so tiny nets stay valid."""
    return max(4, int(round(channels * width)))


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Group norm keeps no running statistics, so distributed workers have none to sync.
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'group'")


class PreActBottleneck(nn.Module):
    """norm-relu-conv1x1 -> norm-relu-conv3x3(stride, dilation) -> norm-relu-conv1x1, plus shortcut."""

    def __init__(self, *, in_ch: int, out_ch: int, mid_ch: int, stride: int = 1,
                 dilation: int = 1, norm: str = "batch"):
        super().__init__()
        self.norm1 = norm_layer(norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.norm2 = norm_layer(norm, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.norm3 = norm_layer(norm, mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        # v2 projects the pre-activated input, so the identity path stays un-normalised.
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        y = self.conv1(pre)
        y = self.conv2(torch.relu(self.norm2(y)))
        y = self.conv3(torch.relu(self.norm3(y)))
        return y + skip


@dataclass
class TrunkOutput:
    taps: dict[str, Tensor]  # every block-3 unit, each (B, C3, H/os, W/os), in order
    out: Tensor  # the final block-3 output (== the last tap)


class ResNetV2Trunk(nn.Module):
    """ResNet-v2 through block 3. `units` overrides `depth` for custom small nets."""

    def __init__(self, *, depth: int = 101, width: float = 1.0, output_stride: int = 16,
                 norm: str = "batch", units: tuple[int, int, int] | None = None,
                 channels_last: bool = False):
        """`channels_last`: NHWC weights and activations (the same numbers up to rounding; the
        faster layout on CPUs with oneDNN and on tensor-core GPUs: benchmarks/gpu_step.py)."""
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if units is None:
            if depth not in DEPTH_UNITS:
                raise ValueError(f"depth must be one of {sorted(DEPTH_UNITS)}, got {depth}")
            units = DEPTH_UNITS[depth]
        self.units = tuple(units)
        self.output_stride = output_stride
        root_ch = scaled(64, width)
        self.root = nn.Sequential(
            nn.Conv2d(3, root_ch, 7, stride=2, padding=3, bias=False),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks, in_ch, stride, dilation = [], root_ch, 4, 1
        for n, out, block_stride in zip(self.units, BLOCK_CHANNELS, BLOCK_STRIDES):
            out_ch, mid_ch = scaled(out, width), scaled(out // 4, width)
            layers = []
            for u in range(n):
                s = block_stride if u == 0 else 1
                if s > 1 and stride >= output_stride:
                    # Past the target stride: keep resolution, widen the receptive field instead.
                    dilation, s = dilation * s, 1
                elif s > 1:
                    stride *= s
                layers.append(PreActBottleneck(in_ch=in_ch, out_ch=out_ch, mid_ch=mid_ch,
                                               stride=s, dilation=dilation, norm=norm))
                in_ch = out_ch
            blocks.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = blocks
        self.out_channels = in_ch
        self.tap_names = tuple(f"block3/unit_{u + 1}" for u in range(self.units[2]))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: Tensor) -> TrunkOutput:  # x: (B, 3, H, W)
        x = x.contiguous(memory_format=self.memory_format)
        x = self.block2(self.block1(self.root(x)))
        taps = {}
        for name, unit in zip(self.tap_names, self.block3):
            x = unit(x)
            taps[name] = x
        return TrunkOutput(taps=taps, out=x)
