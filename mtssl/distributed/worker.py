"""A worker: one task's gradients on this worker's slice of every global batch.

Each round it receives the task's parameters and buffers from the coordinator, draws its slice
(`shard=(index, workers)`) of the batch the coordinator names, computes gradients with the
same `TaskFeed` the single-process trainer runs in-process, and reduces them (summed; the
coordinator divides by the worker count, so the update uses the mean over the global batch)
together with its buffers after the forward pass, then reports loss, metrics, samples, skipped
items and device-seconds.
"""

from __future__ import annotations

import logging
import socket

import torch

from mtssl.accounting import DeviceClock, device_type
from mtssl.config import Config
from mtssl.data.sources import TaskData
from mtssl.distributed.protocol import CONTINUE, STOP, Layout, role_name, worker_rank
from mtssl.distributed.transport import connect, disconnect, guarded
from mtssl.env import RoleEnv
from mtssl.metrics import Metrics
from mtssl.models.multitask import MultiTaskNet, build_trunk, trunk_info
from mtssl.preflight import check_data
from mtssl.tasks import TASKS
from mtssl.train import TaskFeed, TrainingError, resolve_device

log = logging.getLogger("mtssl.worker")


def single_task_net(cfg: Config, task: str) -> MultiTaskNet:
    """Trunk + one task's head and read-out: parameter names match the coordinator's full net."""
    trunk = build_trunk(cfg)
    head = TASKS[task].build_head(getattr(cfg.tasks, task), trunk_info(cfg, trunk))
    return MultiTaskNet(trunk=trunk, heads={task: head}, lasso_mode=cfg.lasso.mode)


class Worker:
    def __init__(self, cfg: Config, env: RoleEnv):
        self.cfg, self.env = cfg, env
        self.task, self.index = env.task, env.index
        self.name = role_name(self.task, self.index)
        self.workers = getattr(cfg.tasks, self.task).workers
        self.rank = worker_rank(cfg, self.task, self.index)
        self.device = resolve_device(env.device)
        self.model = single_task_net(cfg, self.task).to(self.device).train()
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.layout = Layout.of(self.model, self.task)
        self.data = TaskData(cfg)
        check_data(self.data, [self.task])  # before joining: a bad folder fails here, in one line
        self.metrics = Metrics(run=env.run, role="worker", device_type=device_type(self.device.type))
        self.rounds = 0

    def run(self) -> int:
        """Serve rounds until the coordinator says stop; returns the number of rounds served."""
        import torch.distributed as dist
        self.metrics.serve(port=self.env.metrics_port, host=self.cfg.metrics.host)
        log.info("%s: rank %d, device %s, joining %s:%d", self.name, self.rank, self.device,
                 self.env.addr, self.env.port)
        group = connect(self.cfg, self.env, rank=self.rank)[self.task]
        try:
            hello = {"rank": self.rank, "name": self.name, "host": socket.gethostname(),
                     "fingerprint": self.layout.fingerprint(self.cfg),
                     "device_type": self.metrics.device_type}
            with guarded(f"{self.name}: greeting the coordinator"):
                dist.gather_object(hello, None, dst=0, group=group)
            self.serve(group)
        finally:
            disconnect()
        return self.rounds

    def serve(self, group) -> None:
        import torch.distributed as dist
        down = torch.empty(self.layout.down_size)
        up = torch.empty(self.layout.up_size)
        feed = TaskFeed(self.cfg, self.task, model=self.model, data=self.data, device=self.device,
                        clock=DeviceClock(), shard=(self.index, self.workers))
        while True:
            with guarded(f"{self.name}: receiving parameters from the coordinator"):
                dist.broadcast(down, src=0, group=group)
            command, step, batch_index, _ = self.layout.header(down)
            if command == STOP:
                log.info("%s: stop after %d rounds", self.name, self.rounds)
                return
            if command != CONTINUE:
                raise TrainingError(f"{self.name}: the coordinator aborted the run (see its log: "
                                    "every role must run the same config)")
            self.layout.unpack_down(down, self.params, self.buffers)
            grads, report = feed.compute(step=step, batch_index=batch_index)
            self.layout.pack_up(up, grads, self.buffers)
            with guarded(f"{self.name}: sending gradients to the coordinator"):
                dist.reduce(up, dst=0, op=dist.ReduceOp.SUM, group=group)
            # Counted before the report leaves, so the coordinator's totals never exceed ours.
            feed.finish(report)
            self.metrics.device_seconds(self.task, report["device_s"])
            self.metrics.step(self.task, seconds=report["seconds"], samples=report["samples"])
            # The round syncs anyway: the device's loss and metrics are read here, once.
            report.update(loss=float(report["loss"]),
                          metrics={k: float(v) for k, v in report["metrics"].items()})
            with guarded(f"{self.name}: reporting to the coordinator"):
                dist.gather_object(report, None, dst=0, group=group)
            self.rounds += 1
