"""Single-process multi-task trainer: one batch per task per step, per-task RMSProp updates."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mtssl.checkpoint import CheckpointStore
from mtssl.config import Config, from_dict, save_config, to_dict
from mtssl.data.sources import TaskData
from mtssl.data.stream import loader
from mtssl.models.multitask import MultiTaskNet
from mtssl.optim import PerTaskRMSProp
from mtssl.schedules import lr_scale
from mtssl.storage import open_storage
from mtssl.tasks import TASKS

log = logging.getLogger("mtssl.train")

# Sections that define the model and its optimisation: a resumed run must not change them.
FROZEN_ON_RESUME = ("seed", "trunk", "tasks", "lasso", "harmonization", "optimizer")
CALIBRATION_STREAM = 1000  # stream ids for calibration/evaluation draws, apart from training's


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_seed(seed: int, step: int, task_index: int) -> int:
    """Seed for the torch RNG during one task's step, so resumed runs repeat it exactly."""
    return (seed * 1_000_003 + step * 101 + task_index) % (2**63)


def to_device(batch: dict, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}


def task_gradients(model: MultiTaskNet, task: str, batch: dict[str, Tensor], *, cfg: Config,
                   params: dict[str, torch.nn.Parameter], names: list[str], step: int
                   ) -> tuple[dict[str, Tensor], float, dict[str, float]]:
    """One task's weighted loss (+ lasso L1) and its gradients for the parameters it owns."""
    torch.manual_seed(task_seed(cfg.seed, step, model.tasks.index(task)))
    out = model(task, batch)
    loss = getattr(cfg.tasks, task).weight * out.loss
    penalty = model.mix[task].penalty()
    if penalty is not None and cfg.lasso.l1 > 0:
        loss = loss + cfg.lasso.l1 * penalty
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) in task '{task}' at step {step}; "
                            "stopping without saving, the last good checkpoint is kept")
    wanted = [n for n in names if params[n].requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in wanted], allow_unused=True)
    return ({n: g for n, g in zip(wanted, grads) if g is not None}, out.loss.item(), out.metrics)


@dataclass
class RunState:
    step: int = 0
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {item: reason}
    samples: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.run_dir = cfg.run_dir
        self.store = CheckpointStore(open_storage(cfg.storage_uri), keep_last=cfg.output.keep_last)
        self.model = MultiTaskNet.from_config(cfg).to(self.device)
        self.params = dict(self.model.named_parameters())
        self.owners = self.model.owned_names()
        self.opt = PerTaskRMSProp(
            params=self.params, owners=self.owners,
            lr={t: getattr(cfg.tasks, t).lr for t in self.model.tasks},
            decay=cfg.optimizer.decay, eps=cfg.optimizer.eps, momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay)
        self.state = RunState(skipped={t: {} for t in self.model.tasks},
                              samples={t: 0 for t in self.model.tasks})
        self.data = TaskData(cfg)
        self.resumed = resume and self._restore()
        if not self.resumed:
            self._calibrate()

    # --- state -----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"step": self.state.step, "config": to_dict(self.cfg),
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "skipped": self.state.skipped, "samples": self.state.samples,
                "wall_s": self.state.wall_s}

    def _restore(self) -> bool:
        found = self.store.load_latest()
        if found is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.cfg.storage_uri)
            return False
        ckpt, step = found
        check_resumable(from_dict(ckpt["config"]), self.cfg)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.state = RunState(step=int(ckpt["step"]), skipped=ckpt["skipped"],
                              samples=ckpt["samples"], wall_s=float(ckpt["wall_s"]))
        log.info("resumed from step %d (%s)", step, self.cfg.storage_uri)
        return True

    def _calibrate(self) -> None:
        for task in self.model.tasks:
            n = TASKS[task].calibration_batches(getattr(self.cfg.tasks, task))
            if n:
                stream = self.data.stream(task, stop_batch=n, stream_offset=CALIBRATION_STREAM)
                self.model.heads[task].calibrate(
                    to_device(b, self.device) for b in loader(stream, num_workers=0))

    def save(self) -> None:
        self.store.save(self.checkpoint_state(), step=self.state.step)

    # --- loop ------------------------------------------------------------------------------
    def train(self, *, stop_at: int | None = None) -> RunState:
        """Train to schedule.max_steps (or `stop_at`, an interruption point), then checkpoint."""
        cfg, sched = self.cfg, self.cfg.schedule
        last = min(sched.max_steps, stop_at or sched.max_steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        metrics_path = self.run_dir / "metrics.jsonl"
        truncate_log(metrics_path, self.state.step)
        its = {t: iter(loader(self.data.stream(t, start_batch=self.state.step),
                              num_workers=cfg.data.num_workers)) for t in self.model.tasks}
        self.model.train()
        bar = progress(cfg, self.state.step)
        window, t_window, t0 = Accumulator(), time.perf_counter(), time.perf_counter()
        wall_at_start = self.state.wall_s
        stop_reason = "max_steps" if last == sched.max_steps else "stop_at"
        while self.state.step < last:
            step, scale = self.state.step, lr_scale(
                self.state.step, max_steps=sched.max_steps, warmup_steps=sched.warmup_steps,
                decay=sched.decay, min_ratio=sched.min_lr_ratio)
            grads = {}
            for task in self.model.tasks:
                batch = next(its[task])
                for item, reason in batch["skipped"]:
                    if item not in self.state.skipped[task]:
                        self.state.skipped[task][item] = reason
                batch = to_device(batch, self.device)
                grads[task], loss, metrics = task_gradients(
                    self.model, task, batch, cfg=cfg, params=self.params,
                    names=self.owners[task], step=step)
                n = len(next(iter(batch.values())))
                self.state.samples[task] += n
                window.add(task, loss=loss, n=n, **metrics)
            self.opt.step(grads, lr_scale=scale)
            self.state.step += 1
            self.state.wall_s = wall_at_start + time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(window.postfix(time.perf_counter() - t_window))
            if self.state.step % cfg.output.log_every == 0 or self.state.step == sched.max_steps:
                append_log(metrics_path, window.record(self.state.step, scale,
                                                       time.perf_counter() - t_window))
                window, t_window = Accumulator(), time.perf_counter()
            if self.state.step % cfg.output.checkpoint_every == 0:
                self.save()
            if sched.time_budget_s and time.perf_counter() - t0 >= sched.time_budget_s:
                stop_reason = "time_budget"
                break
        if bar is not None:
            bar.close()
        self.save()
        log.info("stopped at step %d (%s); skipped items: %s", self.state.step, stop_reason,
                 skip_summary(self.state.skipped))
        return self.state


def check_resumable(saved: Config, current: Config) -> None:
    old, new = to_dict(saved), to_dict(current)
    diffs = [k for section in FROZEN_ON_RESUME for k in diff_keys(old[section], new[section], section)]
    if diffs:
        raise TrainingError("cannot resume: the checkpoint was trained with different settings for "
                            + ", ".join(diffs) + " (only schedule, data and output may change)")


def diff_keys(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k2 for k in sorted(set(a) | set(b))
                for k2 in diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [prefix]


def skip_summary(skipped: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    return {t: dict(Counter(items.values())) for t, items in skipped.items() if items}


class Accumulator:
    """Sums per-task numbers over a logging window; reports means."""

    def __init__(self):
        self.sums: dict[str, Counter] = {}
        self.counts: Counter = Counter()
        self.samples: Counter = Counter()

    def add(self, task: str, *, n: int, **values: float) -> None:
        self.sums.setdefault(task, Counter()).update(values)
        self.counts[task] += 1
        self.samples[task] += n

    def means(self) -> dict[str, dict[str, float]]:
        return {t: {k: v / self.counts[t] for k, v in s.items()} for t, s in self.sums.items()}

    def postfix(self, seconds: float) -> str:
        losses = " ".join(f"{t[:6]}={m['loss']:.3g}" for t, m in self.means().items())
        rate = sum(self.samples.values()) / max(seconds, 1e-9)
        return f"{losses} | {rate:.1f} samples/s"

    def record(self, step: int, scale: float, seconds: float) -> dict:
        return {"step": step, "lr_scale": scale, "seconds": seconds,
                "samples_per_s": sum(self.samples.values()) / max(seconds, 1e-9),
                "tasks": self.means()}


def append_log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log records past the checkpoint so the curve has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def progress(cfg: Config, start: int):
    if not cfg.output.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.schedule.max_steps, initial=start, desc=cfg.name, unit="step",
                dynamic_ncols=True, mininterval=1.0)

