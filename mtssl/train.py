"""Single-process multi-task trainer: one batch per task per step, per-task RMSProp updates."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mtssl.accounting import SHARED, DeviceClock, budget_check, device_type
from mtssl.checkpoint import CheckpointStore
from mtssl.config import Config, from_dict, save_config, to_dict
from mtssl.data.sources import JointBatches, TaskBatches, TaskData
from mtssl.data.stream import loader
from mtssl.env import metrics_port, run_name
from mtssl.errors import TrainingError
from mtssl.health import UNHEALTHY, HealthCheck, run_progress
from mtssl.metrics import Metrics
from mtssl.models.multitask import MultiTaskNet
from mtssl.optim import PerTaskRMSProp
from mtssl.precision import autocast
from mtssl.preflight import check_data, open_checked
from mtssl.resume import check_changeable, check_resumable
from mtssl.runlock import RunLock, claim_run
from mtssl.runlog import Accumulator, append_log, progress, truncate_log
from mtssl.schedules import lr_scale
from mtssl.tasks import TASKS

log = logging.getLogger("mtssl.train")

CALIBRATION_STREAM = 1000  # stream ids for calibration/evaluation draws, apart from training's


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_seed(seed: int, step: int, task_id: int) -> int:
    """Seed for the torch RNG during one task's step, so resumed runs repeat it exactly."""
    return (seed * 1_000_003 + step * 101 + task_id) % (2**63)


def to_device(batch: dict, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}


def task_gradients(model: MultiTaskNet, task: str, batch: dict[str, Tensor], *, cfg: Config,
                   params: dict[str, torch.nn.Parameter], names: list[str], step: int,
                   check: bool = True) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """One task's weighted loss (+ lasso L1) and its gradients for the parameters it owns.

    Returns (gradients, the task's unweighted loss, its metrics): the loss and metrics are
    detached 0-dim tensors on the device, so nothing waits for the device here; read them
    (float(), or runlog.Accumulator) when logging. The forward runs at `cfg.trunk.precision`.

    `check`: stop on a non-finite loss or gradient, naming the task and step, at the cost of
    one device sync. A caller checking all tasks of a step at once (one sync per step) passes
    check=False and calls `check_finite(step, {task: (loss, grads), ...})` before updating.

    `model` may hold only some of the config's tasks (a distributed worker's): the seed uses the
    task's stable id (TaskDef.task_id), so every process draws the same numbers.
    """
    torch.manual_seed(task_seed(cfg.seed, step, TASKS[task].task_id))
    device = next(iter(batch.values())).device
    with autocast(cfg.trunk.precision, device):
        out = model(task, batch)
    loss = getattr(cfg.tasks, task).weight * out.loss.float()
    penalty = model.mix[task].penalty()
    if penalty is not None and cfg.lasso.l1 > 0:
        loss = loss + cfg.lasso.l1 * penalty
    wanted = [n for n in names if params[n].requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in wanted], allow_unused=True)
    present = {n: g for n, g in zip(wanted, grads) if g is not None}
    if check:
        check_finite(step, {task: (loss, present)})
    return present, out.loss.detach(), {k: v.detach() if isinstance(v, Tensor) else v
                                        for k, v in out.metrics.items()}


def check_finite(step: int, results: dict[str, tuple[Tensor, dict[str, Tensor]]]) -> None:
    """Raise TrainingError naming the first task (in order) whose loss or gradient is not finite.

    One device sync for all tasks and tensors: the losses and every gradient's L2 norm are
    stacked and tested together (a NaN or inf anywhere makes its norm non-finite). Only when
    that fails are the tensors looked at one by one, to name the task and parameter; a norm that
    overflowed while every element is finite is no error. Caught at the step it happens, the
    task is named rightly instead of whichever task first sees the poisoned parameters next.
    """
    values = []
    for loss, grads in results.values():
        values.append(loss.detach().float().reshape(1))
        if grads:
            values.append(torch.stack(torch._foreach_norm(list(grads.values()))).float())
    if not values or bool(torch.isfinite(torch.cat(values)).all()):
        return
    for task, (loss, grads) in results.items():
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) in task '{task}' at step {step}; "
                                "stopping without saving, the last good checkpoint is kept")
        bad = next((n for n, g in grads.items() if not g.isfinite().all()), None)
        if bad is not None:
            raise TrainingError(f"non-finite gradient for {bad} in task '{task}' at step {step}; "
                                "stopping without saving, the last good checkpoint is kept")


class TaskFeed:
    """One task's share of every step, as a worker computes it: the next batch of the task's
    stream (its `shard` of each global batch), the task's gradients, and a report of the round.

    A distributed worker holds one; the single-process trainer holds one per task in-process.
    Reports are plain data (loss, metrics, samples, device_s, skipped, seconds), so the run
    folds them in the same way wherever they were computed.
    """

    def __init__(self, cfg: Config, task: str, *, model: MultiTaskNet, data: TaskData,
                 device: torch.device, clock: DeviceClock, shard: tuple[int, int] = (0, 1),
                 batches: TaskBatches | JointBatches | None = None):
        """`batches`: where the task's batches come from (TaskData.feeds); default its own
        stream's `shard`."""
        self.cfg, self.task, self.model, self.data = cfg, task, model, data
        self.device, self.clock = device, clock
        self.params = dict(model.named_parameters())
        self.names = model.owned_names()[task]
        self.batches = batches or TaskBatches(data, shard=shard, pin_memory=device.type == "cuda")

    def compute(self, *, step: int, batch_index: int, check: bool = True
                ) -> tuple[dict[str, Tensor], dict]:
        """Gradients of batch `batch_index` at `step`, and the round's report (device_s not yet
        counted: the caller laps the clock once the gradients have left, see `finish`).

        `check`: stop here on a non-finite loss or gradient (one device sync); the in-process
        trainer passes False and checks all tasks of a step at once (`check_finite`)."""
        t0 = time.perf_counter()
        batch = self.batches.batch(self.task, batch_index)
        skipped = batch["skipped"]
        batch = to_device(batch, self.device)
        grads, loss, metrics = task_gradients(self.model, self.task, batch, cfg=self.cfg,
                                              params=self.params, names=self.names, step=step,
                                              check=check)
        report = {"loss": loss, "metrics": metrics, "samples": len(next(iter(batch.values()))),
                  "skipped": skipped, "seconds": time.perf_counter() - t0}
        return grads, report

    def finish(self, report: dict) -> dict:
        """Count the device time since the previous lap as this round's."""
        report["device_s"] = self.clock.lap()
        return report


@dataclass
class Round:
    """One task's completed round, as the run applies it."""
    grads: dict[str, Tensor]  # mean over the task's workers
    reports: list[dict]  # one per worker (TaskFeed reports)
    seconds: float  # the round's time as the driver saw it (the step-time metric)
    buffer_changes: dict[str, Tensor] = field(default_factory=dict)  # distributed: mean change


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
    # Whether the rounds' reports were computed in this process (their device-seconds are then
    # this process's to export) and whether a progress bar may be drawn.
    own_reports = True
    progress_bar = True

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
        self.buffers = dict(self.model.named_buffers())
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
        self.lock = threading.RLock()  # parameters, optimizer and run state (async serves threads)

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

    def shared_time(self, seconds: float) -> None:
        """Time this process spent for all tasks (optimizer step, checkpoints): device time."""
        self.account(SHARED, seconds)

    # --- the loop ----------------------------------------------------------------------------
    # Both launchers drive it: the Trainer with its tasks' feeds in this process, the
    # coordinator with rounds its workers compute. Everything a step decides (update, run
    # state, accounting, log, checkpoints, budgets, milestones, stopping) happens here once.
    def start_loop(self) -> None:
        self.metrics_path = self.open_log()
        self.serve_metrics()
        self.clock = DeviceClock()
        self.t0 = self.saved_at = self.t_window = time.perf_counter()
        self.window = Accumulator()
        self.wall_at_start = self.state.wall_s
        self.bar = (progress(total=self.cfg.schedule.max_steps, start=self.state.step,
                             name=self.cfg.name)
                    if self.progress_bar and self.cfg.output.progress else None)
        if self.budget_exhausted():
            self.request_stop("gpu_budget")

    def stop_due(self) -> str | None:
        sched = self.cfg.schedule
        if sched.time_budget_s and time.perf_counter() - self.t0 >= sched.time_budget_s:
            return "time_budget"
        return "gpu_budget" if self.budget_exhausted() else None

    def run_steps(self, rounds: Callable[[int], dict[str, Round] | None], *, last: int) -> None:
        """Steps until `last`, a stop condition or an incomplete round (`rounds` -> None).

        `rounds(step)` returns every task's completed round of that step; all are applied
        together, as one step of the per-task optimizer.
        """
        while self.stop_reason is None and self.state.step < last:
            due = self.stop_due()
            if due:
                self.request_stop(due)
                break
            step, scale = self.state.step, self.scale_now()
            results = rounds(step)
            if results is None:
                return  # a task's round failed: the state stays at the last full step
            with self.lock:
                self.opt.step({t: r.grads for t, r in results.items()}, lr_scale=scale)
                for task, r in results.items():
                    self.add_buffer_changes(r.buffer_changes)
                    self.record(task, r.reports, r.seconds)
                self.state.step += 1
                self.after_step(scale)

    @torch.no_grad()
    def add_buffer_changes(self, changes: dict[str, Tensor]) -> None:
        for name, change in changes.items():
            buf = self.buffers[name]
            buf.add_(change.round().to(buf.dtype) if not buf.is_floating_point() else change)

    def record(self, task: str, reports: list[dict], seconds: float) -> None:
        """Fold one applied round's reports into the run state, totals, log window and metrics."""
        n = sum(r["samples"] for r in reports)  # loss and metrics: floats or device tensors
        loss = sum(r["loss"] for r in reports) / len(reports)
        keys = reports[0]["metrics"].keys()
        means = {k: sum(r["metrics"][k] for r in reports) / len(reports) for k in keys}
        for r in reports:
            self.account(task, r["device_s"], own=self.own_reports)
            for item, reason in r["skipped"]:
                self.state.skipped[task].setdefault(item, reason)
        self.state.samples[task] += n
        self.state.positions[task] += 1
        self.window.add(task, loss, n, means)
        self.metrics.step(task, seconds=seconds, samples=n)

    def after_step(self, scale: float) -> None:
        """Log, checkpoint, count time and check the budget once the run's step has advanced
        (lock held)."""
        cfg, step = self.cfg, self.state.step
        self.state.wall_s = self.wall_at_start + time.perf_counter() - self.t0
        seconds = time.perf_counter() - self.t_window
        if self.bar is not None:
            self.bar.update(1)
        if step % cfg.output.log_every == 0 or step == cfg.schedule.max_steps:
            # The window's one read from the device; the loss metric and the bar follow it.
            record = {**self.window.record(step, scale, seconds),
                      "device_hours": self.state.device_total_s / 3600,
                      "updates": dict(self.window.counts), "health": self.health_record(),
                      **self.log_extras()}
            append_log(self.metrics_path, record)
            for task, means in record["tasks"].items():
                self.metrics.loss(task, means["loss"])
            if self.bar is not None:
                self.bar.set_postfix_str(self.window.postfix(seconds))
            else:
                log.info("step %d: %s", step, self.window.postfix(seconds))
            self.window, self.t_window = Accumulator(), time.perf_counter()
            self.publish_alpha()
        every_s = cfg.distributed.checkpoint_every_s
        if step % cfg.output.checkpoint_every == 0 or (
                every_s and time.perf_counter() - self.saved_at >= every_s):
            self.save()
            self.saved_at = time.perf_counter()
        self.shared_time(self.clock.lap())
        if self.check_budget():
            self.request_stop("gpu_budget")

    def log_extras(self) -> dict:
        """More fields for a log record (the async coordinator's staleness)."""
        return {}

    def finish_loop(self) -> str:
        """The final checkpoint; returns why the run stopped."""
        if self.bar is not None:
            self.bar.close()
        self.shared_time(self.clock.lap())
        self.publish_totals()
        self.save()
        reason = self.stop_reason or ("max_steps" if self.state.step >= self.cfg.schedule.max_steps
                                      else "stop_at")
        log.info("stopped at step %d (%s); skipped items: %s", self.state.step, reason,
                 skip_summary(self.state.skipped))
        return reason


class Trainer(TrainingRun):
    """All enabled tasks in this process: one worker's feed per task, one batch each per step."""

    def train(self, *, stop_at: int | None = None) -> RunState:
        """Train to schedule.max_steps (or `stop_at`, an interruption point), then checkpoint.

        Also stops (with a checkpoint) at schedule.time_budget_s, budget.gpu_hours or a
        request_stop. Holds the run's lock throughout.
        """
        with RunLock(self.run_dir):
            self.start_loop()
            batches = self.data.feeds(self.model.tasks, pin_memory=self.device.type == "cuda")
            feeds = {t: TaskFeed(self.cfg, t, model=self.model, data=self.data, device=self.device,
                                 clock=self.clock, batches=batches[t]) for t in self.model.tasks}
            self.model.train()

            def rounds(step: int) -> dict[str, Round]:
                done = {}
                for task, feed in feeds.items():
                    grads, report = feed.compute(step=step, batch_index=self.state.positions[task],
                                                 check=False)
                    done[task] = Round(grads, [feed.finish(report)], seconds=report["seconds"])
                # One device sync for the whole step, still naming the task and step.
                check_finite(step, {t: (r.reports[0]["loss"], r.grads) for t, r in done.items()})
                return done

            self.run_steps(rounds, last=min(self.cfg.schedule.max_steps,
                                            stop_at or self.cfg.schedule.max_steps))
            self.finish_loop()
            return self.state


def skip_summary(skipped: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    return {t: dict(Counter(items.values())) for t, items in skipped.items() if items}


