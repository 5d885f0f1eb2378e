"""The task registry: each task file ends in one `TaskDef`; the trainer sees only these."""

from mtssl.tasks import colorization, exemplar, motion_segmentation, relative_position
from mtssl.tasks.base import TaskDef

TASKS: dict[str, TaskDef] = {
    t.TASK.name: t.TASK
    for t in (relative_position, colorization, exemplar, motion_segmentation)
}
