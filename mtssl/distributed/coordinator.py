"""The coordinator (rank 0): canonical parameters, one PerTaskRMSProp, checkpoints, accounting.

Topology: one torch.distributed group of all roles (the coordinator's address is the
rendezvous) and one subgroup per task (the coordinator + that task's workers). A task round on
its subgroup: broadcast parameters down, reduce-sum gradients up, gather the workers' reports
(see protocol.py). gloo runs one collective at a time per group, so each group's operations are
issued in the same order on all its members: in sync mode by one thread, round-robin over the
tasks; in async mode by one thread per task group, each with its own sequence.

- sync: every round sends all tasks the same parameters and applies `PerTaskRMSProp.step` to
  all their gradients at once: the single-process trainer's step, computed by the workers.
- async: each task's update is applied (`deltas` + `apply`) as it arrives; StalenessGate
  bounds how many other updates can land between a task's read and its update.
  The run's step is (updates of all tasks) // (number of tasks), so max_steps means the same
  amount of work in both modes and the lr schedule follows overall progress.
BatchNorm running statistics (and any buffer): workers return their buffers after the forward
pass; the coordinator adds the mean change (returned - sent) of each task, as it sums the
tasks' parameter deltas. This is not the single process's sequential update of the same
statistics, so exact sync equivalence holds for `trunk.norm=group` (no running statistics).
Faults: a failed collective stops the run: the other groups finish their round and get STOP,
the coordinator checkpoints its last consistent state and exits non-zero; workers cut off
from the coordinator fail at once (closed sockets) or after distributed.timeout_s.
Device-seconds: workers report theirs with every round; totals per task live in the state
(and checkpoints) and are what the budget and milestones count. The coordinator's own time is
CPU time on a pod without an accelerator: it is exported (mtssl_device_seconds_total, task
SHARED, device_type cpu) but never counted as GPU-hours. Time after the last checkpoint of a
coordinator that crashes is lost with the work done in it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import torch

from mtssl.accounting import SHARED, DeviceClock
from mtssl.config import Config
from mtssl.distributed.protocol import ABORT, CONTINUE, STOP, Layout
from mtssl.distributed.staleness import StalenessGate
from mtssl.distributed.transport import PeerLost, connect, disconnect, guarded
from mtssl.env import RoleEnv
from mtssl.runlock import RunLock
from mtssl.train import Accumulator, TrainingError, TrainingRun, append_log

log = logging.getLogger("mtssl.coordinator")


class Coordinator(TrainingRun):
    role = "coordinator"

    def __init__(self, cfg: Config, env: RoleEnv, **start):
        """`start`: TrainingRun's resume, force, allow_changed, create_bucket."""
        # Canonical state lives in host memory: gloo moves it, and workers hold the GPUs.
        super().__init__(cfg, device=torch.device("cpu"), **start)
        self.env = env
        self.tasks = self.model.tasks
        self.layouts = {t: Layout.of(self.model, t) for t in self.tasks}
        self.workers = {t: getattr(cfg.tasks, t).workers for t in self.tasks}
        self.buffers = dict(self.model.named_buffers())
        self.lock = threading.RLock()  # canonical parameters, optimizer, run state
        self.failures: dict[str, str] = {}
        self.dead: set[str] = set()  # task groups that can no longer be talked to
        self.window = Accumulator()
        self.staleness_max: dict[str, int] = defaultdict(int)
        self.sent: dict[str, dict[str, torch.Tensor]] = {}  # task -> buffers its workers got
        self.gate: StalenessGate | None = None
        self.error: Exception | None = None  # not a lost peer: the state may be half updated

    # --- control -----------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Finish the rounds in flight, stop every worker, checkpoint (thread and signal safe)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stopping: %s", reason)
        if self.gate is not None:
            self.gate.stop()

    def fail(self, task: str, err: Exception) -> None:
        self.failures[task] = str(err)
        self.dead.add(task)
        log.error("%s", err)
        self.request_stop(f"task {task!r} lost a peer")

    def run(self) -> str:
        """Train until a stop condition; returns its reason. Raises PeerLost after a fault.

        Holds the run's lock throughout: a second coordinator on the same run refuses to start.
        """
        with RunLock(self.run_dir):
            return self._run()

    def _run(self) -> str:
        self.metrics_path = self.open_log()
        self.serve_metrics()
        log.info("coordinator: %s mode, tasks %s, %d processes, rendezvous %s:%d",
                 self.cfg.distributed.mode, self.workers, 1 + sum(self.workers.values()),
                 self.env.addr, self.env.port)
        self.groups = connect(self.cfg, self.env, rank=0)
        try:
            self.greet()
            self.clock = DeviceClock()
            self.t0 = self.saved_at = self.t_window = time.perf_counter()
            self.wall_at_start = self.state.wall_s
            if self.budget_exhausted():
                self.request_stop("gpu_budget")
            try:
                (self.run_async if self.cfg.distributed.mode == "async" else self.run_sync)()
            except Exception as err:  # noqa: BLE001 - stop the workers first, then re-raise
                self.error = err
            self.stop_workers()
            if self.error is not None:
                log.error("stopping without saving, the last good checkpoint is kept")
                raise self.error
            with self.lock:
                self.cpu_seconds(self.clock.lap())
                self.publish_totals()
                self.save()
        finally:
            disconnect()
        if self.failures:
            raise PeerLost("; ".join(self.failures.values()) + f" (checkpoint at step "
                           f"{self.state.step})")
        self.stop_reason = self.stop_reason or "max_steps"
        log.info("stopped at step %d (%s)", self.state.step, self.stop_reason)
        return self.stop_reason

    def cpu_seconds(self, seconds: float) -> None:
        """The coordinator's own time: a CPU-hour metric, not in the run's GPU-hour totals."""
        self.metrics.device_seconds(SHARED, seconds)

    def greet(self) -> None:
        """Every worker must run the same model and data config as the coordinator."""
        import torch.distributed as dist
        wrong = []
        for task, group in self.groups.items():
            hellos = [None] * (1 + self.workers[task])
            with guarded(f"waiting for the workers of {task!r}"):
                dist.gather_object({}, hellos, dst=0, group=group)
            want = self.layouts[task].fingerprint(self.cfg)
            wrong += [f"{h['name']} on {h['host']}" for h in hellos[1:] if h["fingerprint"] != want]
        if wrong:
            for task in self.tasks:
                self.send(task, ABORT)
            raise TrainingError(f"workers {', '.join(wrong)} run a different model or data config "
                                "than the coordinator; start every role with the same config")
        log.info("all %d workers joined", sum(self.workers.values()))

    def stop_workers(self) -> None:
        for task in self.tasks:
            if task not in self.dead:
                try:
                    self.send(task, STOP)
                except PeerLost as err:
                    self.fail(task, err)

    def stop_due(self) -> str | None:
        sched = self.cfg.schedule
        if sched.time_budget_s and time.perf_counter() - self.t0 >= sched.time_budget_s:
            return "time_budget"
        return "gpu_budget" if self.budget_exhausted() else None

    # --- one task's round, in pieces ---------------------------------------------------------
    def send(self, task: str, command: int, *, step: int = 0) -> None:
        import torch.distributed as dist
        layout = self.layouts[task]
        with self.lock:  # a consistent snapshot: no update lands while it is copied
            header = (command, step, self.state.positions[task], sum(self.opt.steps.values()))
            down = layout.pack_down(torch.empty(layout.down_size), header, self.params,
                                    self.buffers)
        with guarded(f"sending parameters to the workers of {task!r}"):
            dist.broadcast(down, src=0, group=self.groups[task])
        self.sent[task] = layout.sent_buffers(down)

    def receive(self, task: str) -> tuple[dict, dict, list[dict]]:
        """(mean gradients, buffer changes, worker reports) of the round in flight."""
        import torch.distributed as dist
        layout, group = self.layouts[task], self.groups[task]
        up = torch.zeros(layout.up_size)
        reports: list = [None] * (1 + self.workers[task])
        with guarded(f"receiving gradients from the workers of {task!r}"):
            dist.reduce(up, dst=0, op=dist.ReduceOp.SUM, group=group)
            dist.gather_object(None, reports, dst=0, group=group)
        grads, buffers = layout.unpack_up(up, self.workers[task])
        changes = {n: b - self.sent[task][n] for n, b in buffers.items()}
        return grads, changes, reports[1:]

    @torch.no_grad()
    def add_buffer_changes(self, changes: dict[str, torch.Tensor]) -> None:
        for name, change in changes.items():
            buf = self.buffers[name]
            buf.add_(change.round().to(buf.dtype) if not buf.is_floating_point() else change)

    def record(self, task: str, reports: list[dict], seconds: float) -> None:
        """Fold one applied round's reports into the run state, totals, log window and metrics."""
        n = sum(r["samples"] for r in reports)
        loss = sum(r["loss"] for r in reports) / len(reports)
        keys = reports[0]["metrics"].keys()
        means = {k: sum(r["metrics"][k] for r in reports) / len(reports) for k in keys}
        for r in reports:
            self.account(task, r["device_s"], own=False)
            for item, reason in r["skipped"]:
                self.state.skipped[task].setdefault(item, reason)
        self.state.samples[task] += n
        self.state.positions[task] += 1
        self.window.add(task, loss=loss, n=n, **means)
        self.metrics.step(task, seconds=seconds, samples=n)
        self.metrics.loss(task, loss)

    def after_step(self, scale: float) -> None:
        """Log and checkpoint once the run's step has advanced (lock held)."""
        cfg, step = self.cfg, self.state.step
        self.state.wall_s = self.wall_at_start + time.perf_counter() - self.t0
        self.cpu_seconds(self.clock.lap())
        if step % cfg.output.log_every == 0 or step == cfg.schedule.max_steps:
            seconds = time.perf_counter() - self.t_window
            record = {**self.window.record(step, scale, seconds),
                      "device_hours": self.state.device_total_s / 3600,
                      "updates": dict(self.window.counts), "health": self.health_record()}
            if cfg.distributed.mode == "async":
                record["staleness_max"] = dict(self.staleness_max)
                self.staleness_max.clear()
            append_log(self.metrics_path, record)
            log.info("step %d: %s", step, self.window.postfix(seconds))
            self.window, self.t_window = Accumulator(), time.perf_counter()
            self.publish_alpha()
        every_s = cfg.distributed.checkpoint_every_s
        if step % cfg.output.checkpoint_every == 0 or (
                every_s and time.perf_counter() - self.saved_at >= every_s):
            self.save()
            self.saved_at = time.perf_counter()

    # --- sync --------------------------------------------------------------------------------
    def run_sync(self) -> None:
        while self.stop_reason is None and self.state.step < self.cfg.schedule.max_steps:
            due = self.stop_due()
            if due:
                self.request_stop(due)
                break
            step, scale = self.state.step, self.scale_now()
            t_round = time.perf_counter()
            live = [t for t in self.tasks if t not in self.dead]
            for task in live:
                try:
                    self.send(task, CONTINUE, step=step)
                except PeerLost as err:
                    self.fail(task, err)
            results = {}
            for task in [t for t in live if t not in self.dead]:
                try:
                    results[task] = self.receive(task)
                except PeerLost as err:
                    self.fail(task, err)
            if self.dead:
                return  # the round is incomplete: the state stays at the last full step
            with self.lock:
                self.opt.step({t: r[0] for t, r in results.items()}, lr_scale=scale)
                seconds = time.perf_counter() - t_round
                for task, (_, changes, reports) in results.items():
                    self.add_buffer_changes(changes)
                    self.record(task, reports, seconds)
                self.state.step += 1
                self.after_step(scale)
                if self.check_budget():
                    self.request_stop("gpu_budget")

    # --- async -------------------------------------------------------------------------------
    def run_async(self) -> None:
        n = len(self.tasks)
        done = sum(self.opt.steps.values())
        self.gate = StalenessGate(max_staleness=self.cfg.distributed.max_staleness,
                                  rounds_left=n * self.cfg.schedule.max_steps - done, version=done)
        if self.stop_reason is not None:
            self.gate.stop()
        threads = [threading.Thread(target=self.serve_task, args=(t,), name=f"serve-{t}",
                                    daemon=True) for t in self.tasks]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            for th in threads:
                th.join(timeout=0.2)  # the main thread stays free for signal handlers
            due = self.stop_due() if self.stop_reason is None else None
            if due:
                self.request_stop(due)

    def serve_task(self, task: str) -> None:
        while True:
            if self.gate.start(task) is None:
                return
            t_round = time.perf_counter()
            try:
                self.send(task, CONTINUE, step=self.state.positions[task])
                grads, changes, reports = self.receive(task)
            except PeerLost as err:
                self.gate.abandon(task)
                self.fail(task, err)
                return
            try:
                self.apply_async(task, grads, changes, reports, time.perf_counter() - t_round)
            except Exception as err:  # noqa: BLE001 - the main thread re-raises it
                self.error = err
                self.gate.abandon(task)
                self.request_stop(f"error in task {task!r}: {err}")
                return

    def apply_async(self, task: str, grads: dict, changes: dict, reports: list[dict],
                    seconds: float) -> None:
        n = len(self.tasks)
        with self.lock:
            scale = self.scale_now()
            self.opt.apply(self.opt.deltas(task, grads, lr_scale=scale))
            self.add_buffer_changes(changes)
            staleness = self.gate.finish(task)
            self.staleness_max[task] = max(self.staleness_max[task], staleness)
            self.metrics.staleness(task, staleness)
            self.record(task, reports, seconds)
            progress = sum(self.opt.steps.values()) // n
            if progress > self.state.step:
                self.state.step = progress
                self.after_step(scale)
            if self.check_budget():
                self.request_stop("gpu_budget")
