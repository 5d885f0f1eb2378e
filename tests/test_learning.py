"""What fixing issue 9 needs to stay fixed: relative position learns on real photos, the
exemplar embedding learns without collapsing, and the learning-health checks tell a healthy head
from a collapsed one. Small real photos (bundled in scikit-image), small trunks, test-sized
budgets. (Relative position's pipeline is also checked in test_tasks.py, on an image whose
layout is readable from colour.)"""

import pytest
import torch

from mtssl.data.embedded import embedded_photos
from mtssl.data.stream import TaskStream
from mtssl.health import effective_rank
from mtssl.models.lasso import TapMix
from mtssl.models.resnet_v2 import ResNetV2Trunk, scaled
from mtssl.optim import PerTaskRMSProp
from mtssl.tasks import TASKS
from mtssl.tasks.base import TrunkInfo

TRUNK = TrunkInfo(channels=64, width=0.0625, output_stride=8, norm="batch")


def train_task(task: str, cfg, *, steps: int, batch_size: int, lr: float = 3e-4, seed: int = 0,
               width: float = 0.0625):
    """Train a tiny trunk + the task's head with the project's per-task RMSProp on the embedded
    photos; returns (trunk, head, mix, the stream's sampler)."""
    torch.manual_seed(seed)
    trunk = ResNetV2Trunk(units=(1, 1, 2), width=width, output_stride=8)
    info = TrunkInfo(channels=scaled(1024, width), width=width, output_stride=8, norm="batch")
    head, mix = TASKS[task].build_head(cfg, info), TapMix(num_taps=2)
    modules = torch.nn.ModuleDict({"trunk": trunk, "head": head, "mix": mix})
    params = dict(modules.named_parameters())
    opt = PerTaskRMSProp(params=params, owners={task: list(params)}, lr={task: lr},
                         momentum=0.9, eps=1e-3, weight_decay=1e-4)
    sampler = TASKS[task].build_sampler(cfg, info, False)
    stream = TaskStream(source=embedded_photos(), sampler=sampler, batch_size=batch_size,
                        seed=seed, stream_id=0)
    for step in range(steps):
        batch = stream.batch(step)
        batch.pop("skipped")
        out = head(batch, lambda x: mix(trunk(x).taps))
        grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
        opt.step({task: {n: g for n, g in zip(params, grads) if g is not None}})
    return trunk, head, mix, sampler


def fresh_batch(sampler, n: int, stream_id: int = 99):
    """New draws (another stream id) from the same photos: not the batches trained on."""
    batch = TaskStream(source=embedded_photos(), sampler=sampler, batch_size=n, seed=1,
                       stream_id=stream_id).batch(0)
    batch.pop("skipped")
    return batch


@pytest.mark.slow
def test_exemplar_embeddings_do_not_collapse_on_real_photos():
    """Retrieval is averaged over 8 fresh batches of 64 (chance 1/64) and compared with the same
    trunk untrained, on the same draws. One batch of 13 was too few to read: on one seed it
    measured 3/13 here and 2/13 on CI's CPU, against a bar of more than 2/13. Measured over
    seeds 0-5 (2026-12-07): trained 0.100-0.129, untrained 0.049-0.072, ratio 1.47-2.51."""
    cfg = TASKS["exemplar"].config_cls(image_size=48, patch_size=16)
    untrained_trunk, untrained_head, untrained_mix, sampler = train_task("exemplar", cfg, steps=0,
                                                                         batch_size=8)
    batches = [fresh_batch(sampler, 64, 99 + k) for k in range(8)]

    def evaluate(trunk, head, mix) -> tuple[float, float]:
        """(mean retrieval accuracy, mean spread) over the fresh batches."""
        with torch.no_grad():
            outs = [head(b, lambda x: mix(trunk(x).taps)) for b in batches]
        assert all(head.collapse(o.metrics) is None for o in outs), [o.metrics for o in outs]
        return tuple(sum(float(o.metrics[k]) for o in outs) / len(outs)
                     for k in ("retrieval_acc", "spread"))

    untrained, _ = evaluate(untrained_trunk, untrained_head, untrained_mix)
    trained, spread = evaluate(*train_task("exemplar", cfg, steps=150, batch_size=8)[:3])
    assert spread > 0.5
    assert trained > 4 / 64, (trained, untrained)
    assert trained > 1.25 * untrained, (trained, untrained)


@pytest.mark.slow
def test_relative_position_learns_on_real_photos():
    """Issue 9: with the grid spanning most of the image (as Doersch et al.'s did; at 45-67 %
    nothing learned in a test budget, docs/experiments.md section 8), a small trunk gets well
    above chance within 600 steps, measured on new draws (other grids, other jitter) from the
    photos it trained on."""
    span = 3 * 32 + 2 * 16 + 2 * 2
    cfg = TASKS["relative_position"].config_cls(patch_size=32, gap=16, jitter=2,
                                                min_pixels=span * span, max_pixels=span * span * 8 // 5)
    trunk, head, mix, sampler = train_task("relative_position", cfg, steps=600, batch_size=8,
                                           lr=1e-4, width=0.125)
    trunk.eval(), head.eval()
    with torch.no_grad():
        out = head(fresh_batch(sampler, 64), lambda x: mix(trunk(x).taps))
    # measured 0.42 (chance 0.125); 0.14 with the image at 2.2-5x the grid's area, as before
    assert out.metrics["acc"] > 2 * out.chance["acc"], out.metrics


def test_health_check_flags_a_collapsed_exemplar_head_and_not_a_healthy_one():
    head = TASKS["exemplar"].build_head(TASKS["exemplar"].config_cls(), TRUNK)
    assert head.collapse({"retrieval_acc": 0.1, "spread": 0.01}) is not None
    assert head.collapse({"retrieval_acc": 0.6, "spread": 1.2}) is None


def test_progress_counts_toward_the_first_limit(tiny_config):
    from mtssl.health import run_progress
    by_steps = tiny_config("schedule.max_steps=100")
    assert run_progress(by_steps, step=25, device_hours=5.0, wall_s=1e6) == 0.25
    budget = tiny_config("schedule.max_steps=1000000", "budget.gpu_hours=2")
    assert run_progress(budget, step=25, device_hours=1.0, wall_s=0) == 0.5
    timed = tiny_config("schedule.max_steps=1000000", "schedule.time_budget_s=100")
    assert run_progress(timed, step=25, device_hours=1.0, wall_s=150) == 1.0


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 16, generator=g)
    one_direction = torch.randn(256, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(spread) > 12
    assert effective_rank(one_direction) == pytest.approx(1.0, abs=0.05)
    assert effective_rank(torch.ones(8, 4)) == 0.0  # no spread at all


def test_health_check_fires_on_collapsed_heads_and_stays_quiet_on_healthy_ones(tiny_config):
    from mtssl.train import Trainer
    run = Trainer(tiny_config("tasks.relative_position.enabled=false",
                              "tasks.colorization.enabled=false", "data.holdout_every=4"))
    assert run.health.split["exemplar"] == "holdout"  # 13 photos: items 3, 7, 11 held out
    healthy = run.health.evaluate(run.model, step=10, progress=1.0)
    assert healthy["exemplar"].status == "learning"  # random features already retrieve views
    assert healthy["exemplar"].chance == pytest.approx(1 / run.health.batches["exemplar"]
                                                       ["views"].shape[0])
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad():
        # Collapse on purpose: the exemplar tower outputs a constant, the motion head too.
        for p in run.model.heads["exemplar"].tower.parameters():
            p.zero_()
        for p in run.model.heads["motion_segmentation"].parameters():
            p.zero_()
    broken = run.health.evaluate(run.model, step=10, progress=1.0)
    assert broken["exemplar"].status == "collapsed" and "collapsed" in broken["exemplar"].detail
    assert broken["motion_segmentation"].status == "at_chance"
    early = run.health.evaluate(run.model, step=1, progress=0.1)
    assert early["motion_segmentation"].status == "warming_up"  # within the grace period
    after = run.model.state_dict()  # checks run with batch statistics and leave the running ones
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)
