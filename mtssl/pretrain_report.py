"""The pre-training report of one run: Markdown + PNG, readable without anything else.

Loss and pretext-metric curves per task (from metrics.jsonl) with the held-out metric and its
chance level, a verdict in words on which tasks learned (the learning-health checks of
mtssl/health.py on the latest checkpoint), each task's own figures (TaskDef.report: colorized
predictions, predicted motion masks) and the lasso alpha heatmap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from mtssl.checkpoint import CheckpointStore
from mtssl.config import from_dict
from mtssl.data.sources import TaskData
from mtssl.errors import UserError
from mtssl.eval.report import plot_alpha_matrix
from mtssl.health import HealthCheck, run_progress
from mtssl.models.multitask import MultiTaskNet
from mtssl.storage import open_storage
from mtssl.tasks import TASKS
from mtssl.train import skip_summary


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({t for r in records for t in r["tasks"]})
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks), 6), squeeze=False)
    steps = [r["step"] for r in records]
    for col, task in enumerate(tasks):
        checks = [(r["step"], r["health"][task]) for r in records
                  if task in (r.get("health") or {})]
        keys = sorted({k for r in records for k in r["tasks"].get(task, {})})
        metric = checks[-1][1]["metric"] if checks else next((k for k in keys if k != "loss"),
                                                             "loss")
        for row, key in enumerate(["loss", metric]):
            ax = axes[row][col]
            ax.plot(steps, [r["tasks"].get(task, {}).get(key, np.nan) for r in records],
                    label="training batches")
            ax.set_title(f"{task}: {key}", fontsize=9)
            ax.set_xlabel("step")
        if checks:
            ax = axes[1][col]
            ax.plot([s for s, _ in checks], [h["value"] for _, h in checks], label="held-out")
            ax.plot([s for s, _ in checks], [h["chance"] for _, h in checks], "k--",
                    label="chance")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no config.yaml")
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    found = CheckpointStore(open_storage(cfg.storage_uri)).load_latest()
    if found is None:
        raise UserError(f"no checkpoint for the run in {run_dir} ({cfg.storage_uri})")
    ckpt, step = found
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = TaskData(cfg)
    model = MultiTaskNet.from_config(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()

    lines = [f"# Pre-training report: {cfg.name}", "",
             f"Checkpoint step {step} of {cfg.schedule.max_steps}; trunk depth {cfg.trunk.depth} "
             f"units {list(model.trunk.units)}, width {cfg.trunk.width}, output stride "
             f"{cfg.trunk.output_stride}; lasso mode `{cfg.lasso.mode}`; training wall time "
             f"{ckpt['wall_s']:.0f} s.", ""]
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        plot_curves(read_metrics(metrics_path), out / "curves.png")
        lines += ["## Training curves", "", "![loss and pretext metric per task](curves.png)", ""]

    health = HealthCheck(cfg, data, model, torch.device("cpu"))
    hours = sum(float(v) for v in ckpt["device_seconds"].values()) / 3600
    found = health.evaluate(model, step=step, progress=run_progress(
        cfg, step=step, device_hours=hours, wall_s=float(ckpt["wall_s"])))
    lines += ["## Did every task learn?", "", verdict(found), "",
              "Pretext metric of the latest checkpoint on a fixed sample of each task's held-out "
              f"items (one source item in {cfg.data.holdout_every} never trained on; "
              "`training items` where the source is too small to hold any out), next to what "
              "a trivial predictor reaches on the same sample.", "",
              "| task | sample | metric | value | chance | feature effective rank | status |",
              "|---|---|---|---|---|---|---|"]
    for task, h in found.items():
        lines.append(f"| {task} | {health.split[task]} items | {h.metric} | {h.value:.3f} | "
                     f"{h.chance:.3f} | {h.effective_rank:.1f} | {h.status} |")
    lines.append("")

    for task, batch in health.batches.items():
        if TASKS[task].report is not None:
            lines += TASKS[task].report(model, batch, out, cfg)

    alpha = model.alpha_matrix().numpy()
    plot_alpha_matrix(alpha, model.tasks, out / "alpha.png")
    lines += ["## Lasso coefficients", "", "![lasso alpha](alpha.png)", "",
              "| task | " + " | ".join(t.split("_")[-1] for t in model.trunk.tap_names) + " |",
              "|---|" + "---|" * len(model.trunk.tap_names)]
    lines += [f"| {t} | " + " | ".join(f"{a:+.3f}" for a in row) + " |"
              for t, row in zip(model.tasks, alpha)]
    lines += ["", "## Skipped source items", "",
              f"`{json.dumps(skip_summary(ckpt['skipped'])) or '{}'}` (task -> reason -> count)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def verdict(found: dict) -> str:
    """Which tasks learned, in words."""
    groups: dict[str, list[str]] = {}
    for task, h in found.items():
        groups.setdefault(h.status, []).append(task)
    words = {"learning": "Learned (pretext metric above chance)",
             "warming_up": "Too early to judge",
             "at_chance": "**Still at chance**", "collapsed": "**Collapsed**",
             "rank_collapse": "**Trunk features collapsed** (effective rank)"}
    return " ".join(f"{words[s]}: {', '.join(ts)}." for s, ts in groups.items())
