"""Single-process multi-task trainer: one batch per task per step, per-task RMSProp updates."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mtssl.accounting import SHARED, DeviceClock, budget_check, device_type
from mtssl.checkpoint import CheckpointStore
from mtssl.config import Config, ConfigError, from_dict, save_config, to_dict
from mtssl.data.sources import TaskData
from mtssl.data.stream import loader
from mtssl.distributed.protocol import MODEL_SECTIONS
from mtssl.env import metrics_port, run_name
from mtssl.health import UNHEALTHY, HealthCheck, run_progress
from mtssl.metrics import Metrics
from mtssl.models.multitask import MultiTaskNet
from mtssl.optim import PerTaskRMSProp
from mtssl.preflight import check_data, open_checked
from mtssl.runlock import RunLock, claim_run
from mtssl.schedules import lr_scale
from mtssl.tasks import TASKS

log = logging.getLogger("mtssl.train")

# Sections that define the model and its optimisation: a resumed run must not change them,
# except how many distributed workers share each task's batches.
FROZEN_ON_RESUME = (*MODEL_SECTIONS, "optimizer")
# Of those, what `--allow-changed` may name: hyper-parameters that change no shape or data, for
# continuing a run (e.g. one that diverged) with new values.
CHANGEABLE_ON_RESUME = ("optimizer.*", "lasso.l1", "tasks.*.lr", "tasks.*.weight")
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
    """One task's weighted loss (+ lasso L1) and its gradients for the parameters it owns.

    `model` may hold only some of the config's tasks (a distributed worker's): the seed uses the
    task's place among the config's enabled tasks, so every process draws the same numbers.
    """
    torch.manual_seed(task_seed(cfg.seed, step, cfg.enabled_tasks().index(task)))
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
    present = {n: g for n, g in zip(wanted, grads) if g is not None}
    # A finite loss can still have non-finite gradients; caught here, the task is named rightly
    # instead of whichever task first sees the poisoned parameters on the next step. One check
    # (one device sync) for all tensors; the name is looked up only on failure.
    if present and not torch.stack([g.isfinite().all() for g in present.values()]).all():
        bad = next(n for n, g in present.items() if not g.isfinite().all())
        raise TrainingError(f"non-finite gradient for {bad} in task '{task}' at step {step}; "
                            "stopping without saving, the last good checkpoint is kept")
    return present, out.loss.item(), out.metrics


@dataclass
class RunState:
    step: int = 0
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {item: reason}
    samples: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    positions: dict[str, int] = field(default_factory=dict)  # task -> next batch of its stream
    device_seconds: dict[str, float] = field(default_factory=dict)  # task or SHARED -> seconds

    @property
    def device_total_s(self) -> float:
        return sum(self.device_seconds.values())


class TrainingRun:
    """The canonical model, per-task optimizer, run state, checkpoints, accounting and metrics.

    The single-process Trainer and the distributed coordinator both hold one; the checkpoint
    layout is the same, so either resumes (and evaluation reads) the other's checkpoints.
    """
    role = "trainer"

    def __init__(self, cfg: Config, *, resume: bool = False, force: bool = False,
                 allow_changed: tuple[str, ...] = (), create_bucket: bool = False,
                 device: torch.device | None = None):
        """`force`: move an existing run aside instead of refusing; `allow_changed`: config keys
        (CHANGEABLE_ON_RESUME) that may differ from the checkpoint's on resume."""
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.run_dir = cfg.run_dir
        self.allow_changed = check_changeable(cfg, allow_changed)
        self.stop_reason: str | None = None  # set by request_stop (a signal): stop after the step
        self.store = CheckpointStore(open_checked(cfg.storage_uri, create_bucket=create_bucket),
                                     keep_last=cfg.output.keep_last)
        claim_run(self.run_dir, self.store.storage, resume=resume, force=force)
        with torch.random.fork_rng(devices=[]):
            # The initial weights are a function of the config's seed: runs and roles agree.
            torch.manual_seed(cfg.seed)
            self.model = MultiTaskNet.from_config(cfg).to(self.device)
        self.params = dict(self.model.named_parameters())
        self.owners = self.model.owned_names()
        self.opt = PerTaskRMSProp(
            params=self.params, owners=self.owners,
            lr={t: getattr(cfg.tasks, t).lr for t in self.model.tasks},
            decay=cfg.optimizer.decay, eps=cfg.optimizer.eps, momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay)
        self.state = RunState(skipped={t: {} for t in self.model.tasks},
                              samples={t: 0 for t in self.model.tasks},
                              positions={t: 0 for t in self.model.tasks})
        self.metrics = Metrics(run=run_name(cfg), role=self.role,
                               device_type=device_type(self.device.type))
        self.data = TaskData(cfg)
        check_data(self.data, self.model.tasks)
        self.resumed = resume and self._restore()
        if not self.resumed:
            self._calibrate()
        self.health = (HealthCheck(cfg, self.data, self.model, self.device)
                       if cfg.health.enabled else None)
        self.budget_checked_s = self.state.device_total_s  # total at the last milestone check

    # --- state -----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"step": self.state.step, "config": to_dict(self.cfg),
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "skipped": self.state.skipped, "samples": self.state.samples,
                "wall_s": self.state.wall_s, "positions": self.state.positions,
                "device_seconds": self.state.device_seconds}

    def _restore(self) -> bool:
        found = self.store.load_latest()
        if found is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.cfg.storage_uri)
            return False
        ckpt, step = found
        check_resumable(from_dict(ckpt["config"]), self.cfg, self.allow_changed)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.state = RunState(step=step, skipped=ckpt["skipped"], samples=ckpt["samples"],
                              wall_s=float(ckpt["wall_s"]), positions=dict(ckpt["positions"]),
                              device_seconds=dict(ckpt["device_seconds"]))
        log.info("resumed from step %d (%s)", step, self.cfg.storage_uri)
        return True

    def _calibrate(self) -> None:
        for task in self.model.tasks:
            n = TASKS[task].calibration_batches(getattr(self.cfg.tasks, task))
            if n:
                stream = self.data.stream(task, stop_batch=n, stream_offset=CALIBRATION_STREAM)
                self.model.heads[task].calibrate(
                    to_device(b, self.device) for b in loader(stream, num_workers=0))

    def request_stop(self, reason: str) -> None:
        """Stop after the step in flight, with a final checkpoint (signal safe)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stopping after this step: %s", reason)

    def save(self, *, milestone: str | None = None) -> None:
        self.store.save(self.checkpoint_state(), step=self.state.step, milestone=milestone)

    # --- accounting and metrics ------------------------------------------------------------
    def serve_metrics(self) -> None:
        if self.metrics.server is None:
            port = self.metrics.serve(port=metrics_port(self.cfg), host=self.cfg.metrics.host)
            if port:
                log.info("serving Prometheus metrics on port %d", port)

    def account(self, task: str, seconds: float, *, own: bool = True) -> None:
        """Add device-seconds to the run's totals; `own`: this process's (also a metric)."""
        self.state.device_seconds[task] = self.state.device_seconds.get(task, 0.0) + seconds
        if own:
            self.metrics.device_seconds(task, seconds)

    def budget_exhausted(self) -> bool:
        budget = self.cfg.budget.gpu_hours
        return budget is not None and self.state.device_total_s / 3600 >= budget

    def check_budget(self) -> bool:
        """Save the milestone checkpoints passed since the last check; True if out of budget."""
        before_s, after_s = self.budget_checked_s, self.state.device_total_s
        self.budget_checked_s = after_s
        names, exhausted = budget_check(before_s, after_s, budget_hours=self.cfg.budget.gpu_hours,
                                        every_hours=self.cfg.milestones.every_gpu_hours)
        for name in names:
            self.save(milestone=name)
            log.info("milestone checkpoint %s at step %d", name, self.state.step)
        self.publish_totals()
        return exhausted

    def publish_totals(self) -> None:
        for task, seconds in self.state.device_seconds.items():
            self.metrics.gpu_hours(task, seconds / 3600)
        self.metrics.budget(budget_hours=self.cfg.budget.gpu_hours,
                            used_hours=self.state.device_total_s / 3600)

    def health_record(self) -> dict | None:
        """Run the learning-health checks (mtssl/health.py); their log record, or None if off."""
        if self.health is None:
            return None
        progress = run_progress(self.cfg, step=self.state.step,
                                device_hours=self.state.device_total_s / 3600,
                                wall_s=self.state.wall_s)
        found = self.health.evaluate(self.model, step=self.state.step, progress=progress)
        for task, h in found.items():
            self.metrics.health(task, metric=h.metric, value=h.value, chance=h.chance,
                                effective_rank=h.effective_rank, status=h.status,
                                unhealthy=UNHEALTHY)
        return {t: asdict(h) for t, h in found.items()}

    def publish_alpha(self) -> None:
        for task in self.model.tasks:
            self.metrics.alpha(task, self.model.mix[task].coefficients())

    def open_log(self) -> Path:
        """The run's metrics.jsonl, cut back to the current step (resume), config saved beside."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        path = self.run_dir / "metrics.jsonl"
        truncate_log(path, self.state.step)
        return path

    def scale_now(self) -> float:
        sched = self.cfg.schedule
        return lr_scale(self.state.step, max_steps=sched.max_steps,
                        warmup_steps=sched.warmup_steps, decay=sched.decay,
                        min_ratio=sched.min_lr_ratio)


class Trainer(TrainingRun):
    """All enabled tasks in this process: one batch per task per step."""

    # --- loop ------------------------------------------------------------------------------
    def train(self, *, stop_at: int | None = None) -> RunState:
        """Train to schedule.max_steps (or `stop_at`, an interruption point), then checkpoint.

        Also stops (with a checkpoint) at schedule.time_budget_s, budget.gpu_hours or a
        request_stop. Holds the run's lock throughout.
        """
        with RunLock(self.run_dir):
            return self._train(stop_at)

    def _train(self, stop_at: int | None) -> RunState:
        cfg, sched = self.cfg, self.cfg.schedule
        last = min(sched.max_steps, stop_at or sched.max_steps)
        metrics_path = self.open_log()
        self.serve_metrics()
        its = {t: iter(loader(self.data.stream(t, start_batch=self.state.positions[t]),
                              num_workers=cfg.data.num_workers)) for t in self.model.tasks}
        self.model.train()
        bar = progress(cfg, self.state.step)
        window, t_window, t0 = Accumulator(), time.perf_counter(), time.perf_counter()
        wall_at_start = self.state.wall_s
        clock = DeviceClock()
        stop_reason = "max_steps" if last == sched.max_steps else "stop_at"
        if self.budget_exhausted():
            last, stop_reason = self.state.step, "gpu_budget"
        while self.state.step < last:
            step, scale = self.state.step, self.scale_now()
            grads = {}
            for task in self.model.tasks:
                t_task = time.perf_counter()
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
                self.state.positions[task] += 1
                window.add(task, loss=loss, n=n, **metrics)
                self.account(task, clock.lap())
                self.metrics.step(task, seconds=time.perf_counter() - t_task, samples=n)
                self.metrics.loss(task, loss)
            self.opt.step(grads, lr_scale=scale)
            self.state.step += 1
            self.state.wall_s = wall_at_start + time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(window.postfix(time.perf_counter() - t_window))
            if self.state.step % cfg.output.log_every == 0 or self.state.step == sched.max_steps:
                record = window.record(self.state.step, scale, time.perf_counter() - t_window)
                record["device_hours"] = self.state.device_total_s / 3600
                record["health"] = self.health_record()
                append_log(metrics_path, record)
                window, t_window = Accumulator(), time.perf_counter()
                self.publish_alpha()
            if self.state.step % cfg.output.checkpoint_every == 0:
                self.save()
            self.account(SHARED, clock.lap())
            if self.check_budget():
                stop_reason = "gpu_budget"
                break
            if sched.time_budget_s and time.perf_counter() - t0 >= sched.time_budget_s:
                stop_reason = "time_budget"
                break
            if self.stop_reason is not None:
                stop_reason = self.stop_reason
                break
        if bar is not None:
            bar.close()
        self.account(SHARED, clock.lap())
        self.publish_totals()
        self.save()
        log.info("stopped at step %d (%s); skipped items: %s", self.state.step, stop_reason,
                 skip_summary(self.state.skipped))
        return self.state


def check_changeable(cfg: Config, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The `--allow-changed` keys, each an existing key matching CHANGEABLE_ON_RESUME."""
    for key in keys:
        node = to_dict(cfg)
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(key, "--allow-changed: no such config key")
            node = node[part]
        if not any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key + ".x", p)
                   for p in CHANGEABLE_ON_RESUME):
            raise ConfigError(key, "--allow-changed: this key cannot change on resume; only "
                                   + ", ".join(CHANGEABLE_ON_RESUME) + " can")
    return tuple(keys)


def check_resumable(saved: Config, current: Config, allowed: tuple[str, ...] = ()) -> None:
    old, new = to_dict(saved), to_dict(current)
    diffs = [k for section in FROZEN_ON_RESUME for k in diff_keys(old[section], new[section], section)
             if not (k.startswith("tasks.") and k.endswith(".workers"))]
    refused = [k for k in diffs if not any(k == a or k.startswith(a + ".") for a in allowed)]
    if refused:
        raise TrainingError("cannot resume: the checkpoint was trained with different settings for "
                            + ", ".join(refused) + " (only schedule, data, output, distributed and "
                            "tasks.<t>.workers may change; name hyper-parameters you mean to change "
                            "with --allow-changed, e.g. --allow-changed tasks.colorization.lr)")
    if diffs:
        log.warning("resuming with changed settings (--allow-changed): %s", ", ".join(diffs))


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
    """On resume, drop log records past the checkpoint so the curve has no duplicates.

    A line that does not parse (a crash mid-write tears the last one) is dropped with a warning:
    the checkpoints, not the log, hold the run's state.
    """
    if not path.exists():
        return
    keep = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = {}
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if line.strip():
                log.warning("%s line %d is torn or not a record; dropped: %.80r", path, number, line)
            continue
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def progress(cfg: Config, start: int):
    if not cfg.output.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.schedule.max_steps, initial=start, desc=cfg.name, unit="step",
                dynamic_ncols=True, mininterval=1.0)

