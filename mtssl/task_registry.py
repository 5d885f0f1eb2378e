"""The task registry, torch-free: what config needs to read and check the task sections.

Each task file ends in one `TaskDef`, everything the rest of the system knows about the task.
Importing `mtssl.tasks` registers the built-in ones; a module named in a config's
`task_modules` registers its own on import. Config checks `tasks:` and `harmonization:`
against this registry, so config never imports a task (nor, through one, torch or PIL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mtssl.validation import require

if TYPE_CHECKING:
    from mtssl.tasks.base import Sampler, TaskHead

# A task's training draws use stream id = task id; calibration and health draws add 1000 and
# 2000 (train.CALIBRATION_STREAM, health.HEALTH_STREAM), so task ids stay below 1000.
MAX_TASK_ID = 999


@dataclass(frozen=True)
class TaskConfig:
    """Fields every task section has; task files subclass it with their own."""
    enabled: bool = True
    weight: float = 1.0  # multiplies the task's loss
    lr: float = 1e-4  # base learning rate of the task's RMSProp (1e-3 measured destructive)
    batch_size: int = 8  # per step, over all of the task's workers together
    workers: int = 1  # distributed: processes (pods) computing this task's gradients

    def __post_init__(self):
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        require(self.batch_size % self.workers == 0, "batch_size",
                f"must split evenly over {self.workers} workers, got {self.batch_size}")
        require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TaskDef:
    name: str
    # The task's stream id and seed offset. Never renumber or reuse one: a run's random draws,
    # and so what its checkpoints mean, depend on it.
    task_id: int
    config_cls: type[TaskConfig]
    source: Literal["images", "frames"]  # images: RGB arrays; frames: (frame, motion mask) pairs
    input_key: str  # the batch entry the network reads (benchmarks count samples by it)
    build_sampler: Callable[..., Sampler]  # (cfg, trunk: TrunkInfo, harmonize: bool) -> Sampler
    build_head: Callable[..., TaskHead]  # (cfg, trunk: TrunkInfo) -> TaskHead
    # (cfg) -> batches drawn for TaskHead.calibrate before step 0
    calibration_batches: Callable[..., int] = lambda cfg: 0
    harmonize: bool = False  # default of harmonization.<name>: Lab L x3 (True) or its own RGB
    harmonize_required: str | None = None  # why harmonization cannot be off; None: it can
    # A config without this task's section still runs it. Only the first four tasks: every
    # config had their sections before a section could be left out; a task added later is off
    # unless a config names it, so registering it changes no existing config or checkpoint.
    enabled_when_absent: bool = False
    # (model, batch, out_dir, cfg) -> Markdown lines of the task's own part of the pre-training
    # report (figures written into out_dir); None: its curves and health row only
    report: Callable[..., list[str]] | None = None


TASKS: dict[str, TaskDef] = {}  # by name, in task-id order


def register(task: TaskDef) -> None:
    taken = {t.task_id: t.name for t in TASKS.values()}
    if task.name in TASKS or task.task_id in taken:
        raise ValueError(f"task {task.name!r} (id {task.task_id}) clashes with the registered "
                         f"{ {n: t.task_id for n, t in TASKS.items()} }")
    if not 0 <= task.task_id <= MAX_TASK_ID:
        raise ValueError(f"task id of {task.name!r} must be in [0, {MAX_TASK_ID}], "
                         f"got {task.task_id}")
    ordered = sorted([*TASKS.values(), task], key=lambda t: t.task_id)
    TASKS.clear()
    TASKS.update((t.name, t) for t in ordered)


def unregister(name: str) -> None:
    del TASKS[name]
