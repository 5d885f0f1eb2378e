"""Head building blocks shared by several tasks."""

from __future__ import annotations

from torch import nn

from mtssl.models.resnet_v2 import PreActBottleneck, norm_layer, scaled


def patch_tower(*, in_ch: int, width: float, norm: str = "batch") -> nn.Sequential:
    """The paper's two extra residual units for patch tasks (relative position, exemplar):
    1024 ch / bottleneck 128 / stride 2, then 512 / 128 / stride 2, closed by norm + ReLU
    because pre-activation units leave their output un-normalised."""
    mid, c1, c2 = scaled(128, width), scaled(1024, width), scaled(512, width)
    return nn.Sequential(
        PreActBottleneck(in_ch=in_ch, out_ch=c1, mid_ch=mid, stride=2, norm=norm),
        PreActBottleneck(in_ch=c1, out_ch=c2, mid_ch=mid, stride=2, norm=norm),
        norm_layer(norm, c2),
        nn.ReLU(),
    )
