"""The run's log: per-task means over a logging window, metrics.jsonl, the progress bar."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("mtssl.train")


class Accumulator:
    """Sums per-task loss and metrics over a logging window on their device; reports means.

    The loss and metrics of a step are 0-dim device tensors (`task_gradients`) or floats (a
    coordinator's reports). Reading each as a float every step would make the host wait for
    the device once per value; this keeps one running sum vector per task on the device and
    reads everything once, when the window is logged (`means`, `record`, `postfix`).
    """

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

    def postfix(self, seconds: float) -> str:
        """Progress-bar text (reads the device: call it at log steps, not every step)."""
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


def progress(*, total: int, start: int, name: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=name, unit="step",
                dynamic_ncols=True, mininterval=1.0)

