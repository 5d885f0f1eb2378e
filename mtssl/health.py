"""Learning health: is every task learning, and is any representation collapsing?

At each log step every task's head is run on a fixed sample of held-out data (source items
training never draws, `data.holdout_every`), and its pretext metric is reported next to the
metric a trivial predictor reaches on the same sample (the chance level, from the head).
A task whose metric stays within `health.margin` of chance after `health.grace_fraction` of
the run is flagged `at_chance`; a head whose own check finds its output collapsed (exemplar:
every image embedded at one point) is flagged `collapsed`; trunk features (mixed block-3 taps,
pooled) whose effective rank (Roy & Vetterli 2007) falls below `health.min_effective_rank`
are flagged `rank_collapse`. Flags are logged once when they appear or clear, exported as
metrics and drawn in the pre-training report.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtssl.config import Config
from mtssl.data.stream import NoUsableData, loader

log = logging.getLogger("mtssl.health")

HEALTH_STREAM = 2000  # stream ids of the health samples, apart from training's and calibration's
UNHEALTHY = ("at_chance", "collapsed", "rank_collapse")


def run_progress(cfg: Config, *, step: int, device_hours: float, wall_s: float) -> float:
    """How far a run is toward whichever limit stops it first (steps, device-hour budget or
    time budget), in [0, 1]: the grace period of the at-chance check is a fraction of this."""
    done = [step / cfg.schedule.max_steps]
    if cfg.budget.gpu_hours:
        done.append(device_hours / cfg.budget.gpu_hours)
    if cfg.schedule.time_budget_s:
        done.append(wall_s / cfg.schedule.time_budget_s)
    return min(1.0, max(done))


def effective_rank(features: Tensor) -> float:
    """exp(entropy of the normalised singular values) of (N, C) features, centred: 1 when all
    rows differ along one direction only, min(N, C) when they spread evenly."""
    x = features.float() - features.float().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@contextmanager
def frozen_norm_statistics(model: nn.Module):
    """Train-mode forward (batch statistics, as in training) that leaves running statistics as
    they were: a health check must not move what evaluation later reads."""
    saved = {k: v.clone() for k, v in model.state_dict().items()
             if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            yield
    finally:
        model.load_state_dict(saved, strict=False)
        model.train(was_training)


@dataclass
class TaskHealth:
    metric: str  # the head's pretext metric
    value: float  # on the held-out sample
    chance: float  # a trivial predictor's value on the same sample
    effective_rank: float  # of the pooled features the head reads
    status: str  # learning, warming_up, or one of UNHEALTHY
    detail: str = ""  # why, in words, when status is not learning


class HealthCheck:
    """A fixed held-out batch per task (drawn once) and the checks run on it."""

    def __init__(self, cfg: Config, data, model, device: torch.device):
        h = cfg.health
        self.cfg, self.device = cfg, device
        self.batches: dict[str, dict[str, Tensor]] = {}
        self.split: dict[str, str] = {}
        self.status: dict[str, str] = {}
        for task in model.tasks:
            size = min(h.samples, getattr(cfg.tasks, task).batch_size * 8)
            split = "holdout"
            try:
                stream = data.stream(task, stop_batch=1, stream_offset=HEALTH_STREAM,
                                     batch_size=size, split=split)
            except NoUsableData as err:  # too few items to hold any out
                log.warning("%s: no held-out items (%s): health checks use training items", task,
                            err)
                split = "train"
                stream = data.stream(task, stop_batch=1, stream_offset=HEALTH_STREAM,
                                     batch_size=size)
            batch = next(iter(loader(stream, num_workers=0)))
            self.batches[task] = {k: v.to(device) for k, v in batch.items()
                                  if isinstance(v, Tensor)}
            self.split[task] = split

    def evaluate(self, model, *, step: int, progress: float) -> dict[str, TaskHealth]:
        """`progress`: run_progress() of the run now (the grace period is measured in it)."""
        h = self.cfg.health
        out: dict[str, TaskHealth] = {}
        with frozen_norm_statistics(model):
            for task, batch in self.batches.items():
                head = model.heads[task]
                pooled: list[Tensor] = []

                def features(x: Tensor, task: str = task) -> Tensor:
                    maps = model.features(task, x)  # (N, C, h, w)
                    pooled.append(maps.mean(dim=(2, 3)))
                    return maps

                result = head(batch, features)
                metrics = {k: float(v) for k, v in result.metrics.items()}  # device tensors
                metric = next(iter(result.chance))  # the head's primary pretext metric
                value, chance = metrics[metric], float(result.chance[metric])
                rank = effective_rank(torch.cat(pooled))
                collapse = head.collapse(metrics)
                if collapse:
                    status, detail = "collapsed", collapse
                elif rank < h.min_effective_rank:
                    status, detail = "rank_collapse", (
                        f"pooled features have effective rank {rank:.2f} "
                        f"(< {h.min_effective_rank}): nearly one direction")
                elif progress < h.grace_fraction:
                    status, detail = "warming_up", ""
                elif value - chance <= h.margin:
                    status, detail = "at_chance", (
                        f"held-out {metric} {value:.3f} is not above chance ({chance:.3f}) "
                        f"by more than {h.margin}")
                else:
                    status, detail = "learning", ""
                out[task] = TaskHealth(metric=metric, value=value, chance=chance,
                                       effective_rank=rank, status=status, detail=detail)
                self._announce(task, out[task], step)
        return out

    def _announce(self, task: str, health: TaskHealth, step: int) -> None:
        before = self.status.get(task)
        self.status[task] = health.status
        if health.status == before:
            return
        if health.status in UNHEALTHY:
            log.warning("step %d: task %s is unhealthy (%s): %s", step, task, health.status,
                        health.detail)
        elif before in UNHEALTHY:
            log.info("step %d: task %s recovered (%s %.3f, chance %.3f)", step, task,
                     health.metric, health.value, health.chance)
