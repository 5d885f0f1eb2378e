"""Sync distributed step time vs the single-process trainer, and bytes moved per step.

Runs `mtssl train` and `mtssl launch --local` (sync mode, coordinator on loopback) on the same
config, so every task sees the same batches, and reads both step times from the runs'
metrics.jsonl (median over the steps after warm-up). The single process runs twice: with
torch's default threads and with one thread (the launcher gives each of its processes
cores // processes threads, so on a small machine every role has one). Bytes per step: the
payload of one round, parameters + buffers down and gradients + buffers + flags up, for every
worker (float32); reports and gloo framing are left out.

    python benchmarks/distributed_step.py                       # quickstart, 1 worker per task
    python benchmarks/distributed_step.py --steps 30 --set tasks.colorization.workers=2
Target (issue 4): distributed / single <= 1.3 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(run_dir: Path, warmup: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records[warmup:])


def run(args: list[str], env: dict | None = None) -> None:
    out = subprocess.run([sys.executable, "-m", "mtssl.cli", *args], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"mtssl {args[0]} failed ({out.returncode}):\n{out.stdout[-3000:]}"
                         f"\n{out.stderr[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payload_bytes(cfg) -> dict[str, int]:
    from mtssl.distributed.protocol import Layout, message_bytes
    from mtssl.models.multitask import MultiTaskNet
    model = MultiTaskNet.from_config(cfg)
    return {t: message_bytes(Layout.of(model, t), getattr(cfg.tasks, t).workers)
            for t in model.tasks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="quickstart")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    from mtssl.config import load_config
    sets = a.overrides + [f"schedule.max_steps={a.steps}", "output.log_every=1",
                          "output.report=false", "output.progress=false",
                          f"output.checkpoint_every={a.steps}", "distributed.mode=sync"]
    cfg = load_config(a.config, sets)
    flags = [x for s in sets for x in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        single, single1, dist = Path(tmp) / "single", Path(tmp) / "single1", Path(tmp) / "dist"
        run(["train", "--config", a.config, *flags, "--out", str(single), "--no-report"])
        run(["train", "--config", a.config, *flags, "--out", str(single1), "--no-report"],
            env={"OMP_NUM_THREADS": "1"})
        run(["launch", "--local", "--config", a.config, *flags, "--out", str(dist),
             "--set", f"distributed.port={free_port()}"])
        t_single, t_single1, t_dist = (step_seconds(d, a.warmup) for d in (single, single1, dist))
    workers = {t: getattr(cfg.tasks, t).workers for t in cfg.enabled_tasks()}
    per_task = payload_bytes(cfg)
    print(f"config {a.config} {' '.join(a.overrides)}; {a.steps} steps, median after {a.warmup}")
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; workers {workers}")
    print(f"single process, default threads : {1000 * t_single:8.1f} ms/step")
    print(f"single process, 1 thread        : {1000 * t_single1:8.1f} ms/step")
    print(f"sync, coordinator on loopback   : {1000 * t_dist:8.1f} ms/step")
    print(f"ratio vs default / vs 1 thread  : {t_dist / t_single:8.2f} / {t_dist / t_single1:.2f}"
          "   (target <= 1.3)")
    print(f"bytes per step                  : {sum(per_task.values()) / 1e6:8.2f} MB  "
          + ", ".join(f"{t} {b / 1e6:.2f}" for t, b in per_task.items()))


if __name__ == "__main__":
    main()
