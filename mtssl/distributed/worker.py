"""A worker: one task's gradients on this worker's slice of every global batch.

Each round it receives the task's parameters and buffers from the coordinator, draws its slice
(`shard=(index, workers)`) of the batch the coordinator names, computes gradients with the
trainer's own `task_gradients`, and reduces them (summed; the coordinator divides by the worker
count, so the update uses the mean over the global batch) together with its buffers after the
forward pass, then reports loss, metrics, samples, skipped items and device-seconds.
"""

from __future__ import annotations

import logging
import socket
import time

import torch

from mtssl.accounting import DeviceClock, device_type
from mtssl.config import Config
from mtssl.data.sources import TaskData
from mtssl.data.stream import loader
from mtssl.distributed.protocol import CONTINUE, STOP, Layout, role_name, worker_rank
from mtssl.distributed.transport import connect, disconnect, guarded
from mtssl.env import RoleEnv
from mtssl.metrics import Metrics
from mtssl.models.multitask import MultiTaskNet, build_trunk, trunk_info
from mtssl.preflight import check_data
from mtssl.tasks import TASKS
from mtssl.train import TrainingError, resolve_device, task_gradients, to_device

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
        self.names = self.model.owned_names()[self.task]
        self.layout = Layout.of(self.model, self.task)
        self.data = TaskData(cfg)
        check_data(self.data, [self.task])  # before joining: a bad folder fails here, in one line
        self.metrics = Metrics(run=env.run, role="worker", device_type=device_type(self.device.type))
        self.rounds = 0

    def batches(self, start: int):
        stream = self.data.stream(self.task, start_batch=start, shard=(self.index, self.workers))
        return iter(loader(stream, num_workers=self.cfg.data.num_workers))

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
        clock, batches, expected = DeviceClock(), None, None
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
            t0 = time.perf_counter()
            self.layout.unpack_down(down, self.params, self.buffers)
            if batch_index != expected:  # first round, or the coordinator moved the position
                batches = self.batches(batch_index)
            batch = next(batches)
            expected = batch_index + 1
            skipped = batch["skipped"]
            batch = to_device(batch, self.device)
            grads, loss, metrics = task_gradients(self.model, self.task, batch, cfg=self.cfg,
                                                  params=self.params, names=self.names, step=step)
            samples = len(next(iter(batch.values())))
            self.layout.pack_up(up, grads, self.buffers)
            seconds = time.perf_counter() - t0
            with guarded(f"{self.name}: sending gradients to the coordinator"):
                dist.reduce(up, dst=0, op=dist.ReduceOp.SUM, group=group)
            spent = clock.lap()
            # Counted before the report leaves, so the coordinator's totals never exceed ours.
            self.metrics.device_seconds(self.task, spent)
            self.metrics.step(self.task, seconds=seconds, samples=samples)
            report = {"loss": loss, "metrics": metrics, "samples": samples, "device_s": spent,
                      "skipped": skipped, "seconds": seconds}
            with guarded(f"{self.name}: reporting to the coordinator"):
                dist.gather_object(report, None, dst=0, group=group)
            self.rounds += 1
