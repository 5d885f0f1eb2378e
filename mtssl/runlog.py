"""The run's log: per-task means over a logging window, metrics.jsonl, the progress bar."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger("mtssl.train")


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


def progress(*, total: int, start: int, name: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=name, unit="step",
                dynamic_ncols=True, mininterval=1.0)

