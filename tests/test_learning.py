"""What fixing issue 9 needs to stay fixed: the pretext tasks learn, the exemplar embedding does
not collapse, and the learning-health checks tell a healthy head from a collapsed one.
Small real photos (bundled in scikit-image), tiny trunks, test-sized budgets."""

import numpy as np
import pytest
import torch

from mtssl.data.embedded import embedded_photos
from mtssl.data.stream import TaskStream
from mtssl.health import effective_rank
from mtssl.models.lasso import TapMix
from mtssl.models.resnet_v2 import ResNetV2Trunk
from mtssl.optim import PerTaskRMSProp
from mtssl.tasks import TASKS
from mtssl.tasks.base import TrunkInfo

TRUNK = TrunkInfo(channels=64, width=0.0625, output_stride=8, norm="batch")


def train_task(task: str, cfg, *, steps: int, batch_size: int, lr: float = 3e-4, seed: int = 0):
    """Train a tiny trunk + the task's head with the project's per-task RMSProp on the embedded
    photos; returns (trunk, head, mix, the stream's sampler)."""
    torch.manual_seed(seed)
    trunk = ResNetV2Trunk(units=(1, 1, 2), width=0.0625, output_stride=8)
    head, mix = TASKS[task].build_head(cfg, TRUNK), TapMix(num_taps=2)
    modules = torch.nn.ModuleDict({"trunk": trunk, "head": head, "mix": mix})
    params = dict(modules.named_parameters())
    opt = PerTaskRMSProp(params=params, owners={task: list(params)}, lr={task: lr},
                         momentum=0.9, eps=1e-3, weight_decay=1e-4)
    sampler = TASKS[task].build_sampler(cfg, TRUNK, task == "relative_position")
    stream = TaskStream(source=embedded_photos(), sampler=sampler, batch_size=batch_size,
                        seed=seed, stream_id=0)
    for step in range(steps):
        batch = stream.batch(step)
        batch.pop("skipped")
        out = head(batch, lambda x: mix(trunk(x).taps))
        grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
        opt.step({task: {n: g for n, g in zip(params, grads) if g is not None}})
    return trunk, head, mix, sampler


def fresh_batch(sampler, n: int):
    """New draws (another stream id) from the same photos: not the batches trained on."""
    batch = TaskStream(source=embedded_photos(), sampler=sampler, batch_size=n, seed=1,
                       stream_id=99).batch(0)
    batch.pop("skipped")
    return batch


@pytest.mark.slow
def test_relative_position_learns_well_above_chance_on_real_photos():
    cfg = TASKS["relative_position"].config_cls(patch_size=16, gap=8, jitter=2, min_pixels=20000,
                                                max_pixels=40000)
    trunk, head, mix, sampler = train_task("relative_position", cfg, steps=250, batch_size=8)
    with torch.no_grad():
        out = head(fresh_batch(sampler, 32), lambda x: mix(trunk(x).taps))  # 256 pairs
    assert out.chance["acc"] == 1 / 8
    assert out.metrics["acc"] > 0.3, out.metrics


@pytest.mark.slow
def test_exemplar_embeddings_do_not_collapse_on_real_photos():
    cfg = TASKS["exemplar"].config_cls(image_size=48, patch_size=16)
    trunk, head, mix, sampler = train_task("exemplar", cfg, steps=150, batch_size=8)
    with torch.no_grad():
        out = head(fresh_batch(sampler, 13), lambda x: mix(trunk(x).taps))
    assert head.collapse(out.metrics) is None, out.metrics
    assert out.metrics["spread"] > 0.5
    assert out.metrics["retrieval_acc"] > 2 * out.chance["retrieval_acc"], out.metrics


def test_health_check_flags_a_collapsed_exemplar_head_and_not_a_healthy_one():
    head = TASKS["exemplar"].build_head(TASKS["exemplar"].config_cls(), TRUNK)
    assert head.collapse({"retrieval_acc": 0.1, "spread": 0.01}) is not None
    assert head.collapse({"retrieval_acc": 0.6, "spread": 1.2}) is None


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 16, generator=g)
    one_direction = torch.randn(256, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(spread) > 12
    assert effective_rank(one_direction) == pytest.approx(1.0, abs=0.05)
    assert effective_rank(torch.ones(8, 4)) == 0.0  # no spread at all
