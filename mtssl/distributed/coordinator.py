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

from mtssl.accounting import SHARED
from mtssl.config import Config
from mtssl.distributed.protocol import ABORT, CONTINUE, STOP, Layout
from mtssl.distributed.staleness import StalenessGate
from mtssl.distributed.transport import PeerLost, connect, disconnect, guarded
from mtssl.env import RoleEnv
from mtssl.runlock import RunLock
from mtssl.train import Round, TrainingError, TrainingRun

log = logging.getLogger("mtssl.coordinator")


class Coordinator(TrainingRun):
    role = "coordinator"
    own_reports = False  # workers export their own device-seconds
    progress_bar = False  # a pod's log: one line per log step instead

    def __init__(self, cfg: Config, env: RoleEnv, **start):
        """`start`: TrainingRun's resume, force, allow_changed, create_bucket."""
        # Canonical state lives in host memory: gloo moves it, and workers hold the GPUs.
        super().__init__(cfg, device=torch.device("cpu"), **start)
        self.env = env
        self.tasks = self.model.tasks
        self.layouts = {t: Layout.of(self.model, t) for t in self.tasks}
        self.workers = {t: getattr(cfg.tasks, t).workers for t in self.tasks}
        self.failures: dict[str, str] = {}
        self.dead: set[str] = set()  # task groups that can no longer be talked to
        self.staleness_max: dict[str, int] = defaultdict(int)
        self.sent: dict[str, dict[str, torch.Tensor]] = {}  # task -> buffers its workers got
        self.gate: StalenessGate | None = None
        self.error: Exception | None = None  # not a lost peer: the state may be half updated

    # --- control -----------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Finish the rounds in flight, stop every worker, checkpoint (thread and signal safe)."""
        super().request_stop(reason)
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
        log.info("coordinator: %s mode, tasks %s, %d processes, rendezvous %s:%d",
                 self.cfg.distributed.mode, self.workers, 1 + sum(self.workers.values()),
                 self.env.addr, self.env.port)
        self.start_loop()
        self.groups = connect(self.cfg, self.env, rank=0)
        try:
            self.greet()
            try:
                if self.cfg.distributed.mode == "async":
                    self.run_async()
                else:
                    self.run_steps(self.sync_round, last=self.cfg.schedule.max_steps)
            except Exception as err:  # noqa: BLE001 - stop the workers first, then re-raise
                self.error = err
            self.stop_workers()
            if self.error is not None:
                log.error("stopping without saving, the last good checkpoint is kept")
                raise self.error
            with self.lock:
                reason = self.finish_loop()
        finally:
            disconnect()
        if self.failures:
            raise PeerLost("; ".join(self.failures.values()) + f" (checkpoint at step "
                           f"{self.state.step})")
        return reason

    def shared_time(self, seconds: float) -> None:
        """The coordinator's own time: a CPU-hour metric, not in the run's GPU-hour totals."""
        self.metrics.device_seconds(SHARED, seconds)

    def log_extras(self) -> dict:
        if self.cfg.distributed.mode != "async":
            return {}
        extras = {"staleness_max": dict(self.staleness_max)}
        self.staleness_max.clear()
        return extras

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

    def receive(self, task: str, started: float) -> Round:
        """The round in flight: mean gradients, buffer changes and the workers' reports."""
        import torch.distributed as dist
        layout, group = self.layouts[task], self.groups[task]
        up = torch.zeros(layout.up_size)
        reports: list = [None] * (1 + self.workers[task])
        with guarded(f"receiving gradients from the workers of {task!r}"):
            dist.reduce(up, dst=0, op=dist.ReduceOp.SUM, group=group)
            dist.gather_object(None, reports, dst=0, group=group)
        grads, buffers = layout.unpack_up(up, self.workers[task])
        changes = {n: b - self.sent[task][n] for n, b in buffers.items()}
        return Round(grads, reports[1:], seconds=time.perf_counter() - started,
                     buffer_changes=changes)

    # --- sync: the trainer's step, computed by the workers -----------------------------------
    def sync_round(self, step: int) -> dict[str, Round] | None:
        """Every live task's round of `step`; None when a task lost a peer."""
        started = time.perf_counter()
        live = [t for t in self.tasks if t not in self.dead]
        for task in live:
            try:
                self.send(task, CONTINUE, step=step)
            except PeerLost as err:
                self.fail(task, err)
        results = {}
        for task in [t for t in live if t not in self.dead]:
            try:
                results[task] = self.receive(task, started)
            except PeerLost as err:
                self.fail(task, err)
        return None if self.dead else results

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
            started = time.perf_counter()
            try:
                self.send(task, CONTINUE, step=self.state.positions[task])
                result = self.receive(task, started)
            except PeerLost as err:
                self.gate.abandon(task)
                self.fail(task, err)
                return
            try:
                self.apply_async(task, result)
            except Exception as err:  # noqa: BLE001 - the main thread re-raises it
                self.error = err
                self.gate.abandon(task)
                self.request_stop(f"error in task {task!r}: {err}")
                return

    def apply_async(self, task: str, result: Round) -> None:
        """One task's update as it arrives; the run's step advances every n updates."""
        n = len(self.tasks)
        with self.lock:
            scale = self.scale_now()
            self.opt.apply(self.opt.deltas(task, result.grads, lr_scale=scale))
            self.add_buffer_changes(result.buffer_changes)
            staleness = self.gate.finish(task)
            self.staleness_max[task] = max(self.staleness_max[task], staleness)
            self.metrics.staleness(task, staleness)
            self.record(task, result.reports, result.seconds)
            progress = sum(self.opt.steps.values()) // n
            if progress > self.state.step:
                self.state.step = progress
                self.after_step(scale)
            elif self.check_budget():  # milestones between steps too
                self.request_stop("gpu_budget")
