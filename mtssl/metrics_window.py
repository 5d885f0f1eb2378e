"""A logging window's per-task loss and metrics, summed on the device and read once at log time.

`task_gradients` returns its loss and metrics as 0-dim device tensors; reading each as a float
every step would make the host wait for the device once per value (on a GPU, the pipeline
drains each time). `DeviceAccumulator` keeps one running sum vector per task on the device
(one stack and one add per task and step) and transfers everything in one read when the
window is logged. Its `record` is the same record as `mtssl.train.Accumulator.record`.

Use in a training loop:

    window = DeviceAccumulator()
    ...each step, each task:
        grads, loss, metrics = task_gradients(..., check=False)
        window.add(task, loss, n, metrics)
    ...once per step: check_finite(step, {task: (loss, grads), ...}); opt.step(...)
    ...at a log step:
        record = window.record(step, scale, seconds)   # the one host read of the window
        losses = window.last_means()                    # {task: {"loss": .., ...}}, no new read
        window = DeviceAccumulator()

`add` also takes floats (a distributed coordinator's reports).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor


class DeviceAccumulator:
    """Sums per-task loss and metrics over a logging window on their device; reports means."""

    def __init__(self):
        self.keys: dict[str, tuple[str, ...]] = {}  # task -> ("loss", metric names...)
        self.sums: dict[str, Tensor] = {}  # task -> (1 + metrics,) float32 running sum
        self.counts: Counter = Counter()
        self.samples: Counter = Counter()
        self._means: dict[str, dict[str, float]] | None = None

    def add(self, task: str, loss: Tensor | float, n: int,
            metrics: dict[str, Tensor | float]) -> None:
        """One step of one task: nothing is read from the device."""
        keys = ("loss", *metrics)
        if self.keys.setdefault(task, keys) != keys:
            raise ValueError(f"task {task!r} reported metrics {keys[1:]}, earlier "
                             f"{self.keys[task][1:]} in this window")
        device = loss.device if isinstance(loss, Tensor) else torch.device("cpu")
        values = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(())
                              for v in (loss, *metrics.values())])
        self.sums[task] = self.sums[task] + values if task in self.sums else values
        self.counts[task] += 1
        self.samples[task] += n
        self._means = None

    def means(self) -> dict[str, dict[str, float]]:
        """{task: {"loss": mean, metric: mean, ...}}: one read from the device for all tasks."""
        if self._means is None:
            tasks = list(self.sums)
            if len({s.device for s in self.sums.values()}) > 1:  # mixed devices: one read each
                flat = [x for s in self.sums.values() for x in s.tolist()]
            else:
                flat = torch.cat(list(self.sums.values())).tolist() if tasks else []
            self._means, i = {}, 0
            for t in tasks:
                keys = self.keys[t]
                self._means[t] = {k: v / self.counts[t] for k, v in zip(keys, flat[i:i + len(keys)])}
                i += len(keys)
        return self._means

    last_means = means  # after record(): the same numbers, no new read

    def postfix(self, seconds: float) -> str:
        """Progress-bar text (reads the device: call it at log steps, not every step)."""
        losses = " ".join(f"{t[:6]}={m['loss']:.3g}" for t, m in self.means().items())
        rate = sum(self.samples.values()) / max(seconds, 1e-9)
        return f"{losses} | {rate:.1f} samples/s"

    def record(self, step: int, scale: float, seconds: float) -> dict:
        return {"step": step, "lr_scale": scale, "seconds": seconds,
                "samples_per_s": sum(self.samples.values()) / max(seconds, 1e-9),
                "tasks": self.means()}
