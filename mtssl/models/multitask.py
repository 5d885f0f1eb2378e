"""One trunk, one read-out (naive or lasso) and one head per task, built from the config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from mtssl.config import Config
from mtssl.models.lasso import TapMix, one_hot_alpha
from mtssl.models.resnet_v2 import ResNetV2Trunk
from mtssl.tasks import TASKS
from mtssl.tasks.base import TaskHead, TaskOutput, TrunkInfo


def build_trunk(cfg: Config) -> ResNetV2Trunk:
    t = cfg.trunk
    trunk = ResNetV2Trunk(depth=t.depth, width=t.width, output_stride=t.output_stride,
                          norm=t.norm, units=t.units, channels_last=t.channels_last)
    if t.compile:
        trunk.compile()  # nn.Module.compile: in place, so checkpoints keep their names
    return trunk


def trunk_info(cfg: Config, trunk: ResNetV2Trunk) -> TrunkInfo:
    return TrunkInfo(channels=trunk.out_channels, width=cfg.trunk.width,
                     output_stride=cfg.trunk.output_stride, norm=cfg.trunk.norm)


M = TypeVar("M", bound=nn.Module)


class TaskModules(nn.ModuleDict, Generic[M]):
    """An nn.ModuleDict keyed by task whose entries are all M, so that `net.heads[task]` types
    as a TaskHead and `net.mix[task]` as a TapMix (nn.ModuleDict's own items type as Module)."""

    def __getitem__(self, key: str) -> M:
        return cast(M, super().__getitem__(key))


class MultiTaskNet(nn.Module):
    def __init__(self, *, trunk: ResNetV2Trunk, heads: Mapping[str, TaskHead], lasso_mode: str):
        super().__init__()
        self.trunk = trunk
        self.heads: TaskModules[TaskHead] = TaskModules(heads)
        self.mix: TaskModules[TapMix] = TaskModules(
            {t: TapMix(num_taps=len(trunk.tap_names), mode=lasso_mode) for t in heads})

    @classmethod
    def from_config(cls, cfg: Config) -> "MultiTaskNet":
        trunk = build_trunk(cfg)
        info = trunk_info(cfg, trunk)
        heads = {t: TASKS[t].build_head(getattr(cfg.tasks, t), info) for t in cfg.enabled_tasks()}
        return cls(trunk=trunk, heads=heads, lasso_mode=cfg.lasso.mode)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def features(self, task: str, x: Tensor) -> Tensor:
        return self.mix[task](self.trunk(x).taps)

    def forward(self, task: str, batch: dict[str, Tensor]) -> TaskOutput:
        return self.heads[task](batch, lambda x: self.features(task, x))

    def owned_names(self) -> dict[str, list[str]]:
        """Per task, the parameter names its optimizer updates: the trunk plus its own head/alpha."""
        names = [n for n, _ in self.named_parameters()]
        shared = [n for n in names if n.startswith("trunk.")]
        return {t: shared + [n for n in names if n.startswith((f"heads.{t}.", f"mix.{t}."))]
                for t in self.heads}

    def alpha_matrix(self) -> Tensor:
        """(tasks, block-3 units) unit-norm lasso coefficients; naive rows are one-hot on the last
        unit."""
        rows = []
        for t in self.heads:
            alpha = self.mix[t].coefficients()
            if alpha is None:
                alpha = one_hot_alpha(len(self.trunk.tap_names))
            rows.append(alpha.detach().cpu())
        return torch.stack(rows)
