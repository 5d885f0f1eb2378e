"""Prometheus metrics of one process (trainer, coordinator or worker), via prometheus-client.

Every metric carries the label `run`; the names and labels are the contract in
notes/contracts.md. Each process keeps its own registry and, when a port is given, serves it
over HTTP at /metrics.
"""

from __future__ import annotations

import math
import time

import torch

from mtssl.accounting import remaining_hours
from mtssl.validation import ConfigError

ALPHA_ZERO = 1e-3  # |alpha| below this counts as switched off
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def alpha_sparsity(alpha: torch.Tensor | None) -> float:
    """Fraction of a lasso row's coefficients with |alpha| < ALPHA_ZERO (naive mode: no row, 0)."""
    if alpha is None or alpha.numel() == 0:
        return 0.0
    return float((alpha.detach().abs() < ALPHA_ZERO).float().mean())


class Metrics:
    """The mtssl metrics of one process; `role` is trainer, coordinator or worker."""

    def __init__(self, *, run: str, role: str, device_type: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.run, self.role, self.device_type = run, role, device_type
        self.registry = r = CollectorRegistry()
        self.server = None
        self.port: int | None = None
        by_role = ["run", "task", "role"]
        self._device_s = Counter("mtssl_device_seconds_total",
                                 "Device-seconds held while training (devices x wall seconds)",
                                 by_role + ["device_type"], registry=r)
        self._steps = Counter("mtssl_steps_total", "Optimisation steps (rounds) of a task",
                              by_role, registry=r)
        self._samples = Counter("mtssl_samples_total", "Training samples consumed", by_role,
                                registry=r)
        self._duration = Histogram("mtssl_step_duration_seconds", "Wall seconds of one task step",
                                   by_role, buckets=STEP_BUCKETS, registry=r)
        self._loss = Gauge("mtssl_task_loss", "Latest loss of a task (mean over its global batch)",
                           ["run", "task"], registry=r)
        self._staleness = Gauge("mtssl_staleness_steps",
                                "Parameter versions applied between a task's read and its update",
                                ["run", "task"], registry=r)
        self._sparsity = Gauge("mtssl_lasso_alpha_sparsity_ratio",
                               "Fraction of a task's lasso coefficients with |alpha| < 1e-3",
                               ["run", "task"], registry=r)
        self._budget = Gauge("mtssl_budget_gpu_hours", "Configured device-hour budget", ["run"],
                             registry=r)
        self._remaining = Gauge("mtssl_budget_remaining_gpu_hours", "Device-hours left in the budget",
                                ["run"], registry=r)
        self._gpu_hours = Gauge("mtssl_gpu_hours_total",
                                "Device-hours of a task in the run's (checkpointed) totals",
                                ["run", "task"], registry=r)
        self._heldout = Gauge("mtssl_pretext_heldout",
                              "A task's pretext metric on its fixed held-out sample",
                              ["run", "task", "metric"], registry=r)
        self._chance = Gauge("mtssl_pretext_chance",
                             "What a trivial predictor reaches on the same held-out sample",
                             ["run", "task", "metric"], registry=r)
        self._erank = Gauge("mtssl_feature_effective_rank",
                            "Effective rank of the pooled trunk features a task's head reads",
                            ["run", "task"], registry=r)
        self._unhealthy = Gauge("mtssl_task_unhealthy",
                                "1 while a task is at chance or collapsed (see status label)",
                                ["run", "task", "status"], registry=r)
        self._last_step = Gauge("mtssl_last_step_timestamp_seconds",
                                "Unix time of a task's latest completed step", ["run", "task"],
                                registry=r)

    def serve(self, *, port: int, host: str = "0.0.0.0") -> int | None:
        """Start the /metrics HTTP server (port 0: not served). Returns the bound port."""
        if not port:
            return None
        from prometheus_client import start_http_server
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise ConfigError("metrics.port", f"cannot serve metrics on {host}:{port} "
                                              f"({err.strerror}); pick another port") from None
        self.port = self.server.server_port
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def device_seconds(self, task: str, seconds: float) -> None:
        self._device_s.labels(self.run, task, self.role, self.device_type).inc(max(0.0, seconds))

    def step(self, task: str, *, seconds: float, samples: int) -> None:
        self._steps.labels(self.run, task, self.role).inc()
        self._samples.labels(self.run, task, self.role).inc(samples)
        self._duration.labels(self.run, task, self.role).observe(seconds)
        self._last_step.labels(self.run, task).set(time.time())

    def health(self, task: str, *, metric: str, value: float, chance: float,
               effective_rank: float, status: str, unhealthy: tuple[str, ...]) -> None:
        self._heldout.labels(self.run, task, metric).set(value)
        self._chance.labels(self.run, task, metric).set(chance)
        self._erank.labels(self.run, task).set(effective_rank)
        for s in unhealthy:
            self._unhealthy.labels(self.run, task, s).set(float(s == status))

    def loss(self, task: str, value: float) -> None:
        self._loss.labels(self.run, task).set(value)

    def staleness(self, task: str, versions: int) -> None:
        self._staleness.labels(self.run, task).set(versions)

    def alpha(self, task: str, alpha: torch.Tensor | None) -> None:
        self._sparsity.labels(self.run, task).set(alpha_sparsity(alpha))

    def budget(self, *, budget_hours: float | None, used_hours: float) -> None:
        # No budget: the budget series stay absent rather than reporting a made-up number.
        if budget_hours is None:
            return
        self._budget.labels(self.run).set(budget_hours)
        self._remaining.labels(self.run).set(remaining_hours(budget_hours, used_hours))

    def gpu_hours(self, task: str, hours: float) -> None:
        self._gpu_hours.labels(self.run, task).set(hours)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (NaN if absent); for tests and the benchmark."""
        v = self.registry.get_sample_value(name, {"run": self.run, **labels})
        return math.nan if v is None else v
