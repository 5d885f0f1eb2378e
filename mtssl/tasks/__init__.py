"""The built-in tasks: importing this package registers them. Each task file ends in one
`TaskDef`; the rest of the system knows tasks only through the registry (`TASKS`)."""

from mtssl.task_registry import TASKS, register
from mtssl.tasks import colorization, exemplar, motion_segmentation, relative_position

__all__ = ["TASKS"]

for _task_file in (relative_position, colorization, exemplar, motion_segmentation):
    register(_task_file.TASK)
