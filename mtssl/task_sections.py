"""The config sections keyed by task name (`tasks:`, `harmonization:`), read against the task
registry so that config needs no task file; config.py owns them and reads them with its
own coercion, which it passes in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

from mtssl.task_registry import TASKS, TaskDef
from mtssl.validation import ConfigError, require

Coerce = Callable[[Any, Any, str], Any]  # config._coerce: (value, type, dotted key) -> value


def require_registered() -> None:
    if not TASKS:
        raise ConfigError("tasks", "no tasks are registered: import mtssl.tasks (and any "
                                   "task_modules) before reading a config")


class TaskSections(Mapping[str, Any]):
    """A section keyed by task name, in task-id order; which names exist is the registry's
    (mtssl/task_registry.py). It holds the entries a config gives plus those of the tasks
    enabled when absent; any other registered task reads as `missing`. So registering a task
    changes neither what an existing config means nor what `to_dict` writes for it.
    Frozen, comparable, hashable and picklable like the dataclass sections."""

    __slots__ = ("_items",)
    key: ClassVar[str]  # the section's name in Config

    def __init__(self, items: Mapping[str, Any] | None = None):
        require_registered()
        items = dict(items or {})
        for name in items:
            require(name in TASKS, name, f"unknown task; registered tasks are: {', '.join(TASKS)}")
        object.__setattr__(self, "_items", {
            name: items[name] if name in items else self.missing(task)
            for name, task in TASKS.items() if name in items or task.enabled_when_absent})
        for name, value in self._items.items():
            self.check(TASKS[name], value)

    @classmethod
    def from_data(cls, data: Any, prefix: str, coerce: Coerce) -> TaskSections:
        """From YAML data; `coerce` is config's (value, type, key) -> checked value."""
        require_registered()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(prefix, f"expected a mapping of task names ({', '.join(TASKS)}), "
                                      f"got {data!r}")
        items = {}
        for name, value in data.items():
            require(name in TASKS, f"{prefix}.{name}",
                    f"unknown task; registered tasks are: {', '.join(TASKS)}")
            items[name] = coerce(value, cls.entry_type(TASKS[name]), f"{prefix}.{name}")
        try:
            return cls(items)
        except ConfigError as err:
            key = ".".join(p for p in (prefix, err.key) if p)
            raise ConfigError(key, str(err).split("': ", 1)[-1]) from None

    @staticmethod
    def entry_type(task: TaskDef) -> type:
        """The type one task's entry is read as."""
        raise NotImplementedError

    def missing(self, task: TaskDef) -> Any:
        """The entry of a registered task the config does not name."""
        raise NotImplementedError

    def check(self, task: TaskDef, value: Any) -> None:
        """Range checks of one entry, raising ConfigError keyed by the task's name."""

    def __getitem__(self, name: str) -> Any:
        if name in self._items:
            return self._items[name]
        if name in TASKS:
            return self.missing(TASKS[name])
        raise KeyError(name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not an entry: lets copy and pickle probe the instance
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no task {name!r}; registered: {', '.join(TASKS)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._items == self._items

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __reduce__(self):
        return type(self), (self._items,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class TasksConfig(TaskSections):
    """tasks.<name>: each task's own section (its TaskDef's config_cls); absent: disabled."""
    key = "tasks"

    def __init__(self, items: Mapping[str, Any] | None = None):
        super().__init__(items)
        require(any(t.enabled for t in self._items.values()), "",
                f"at least one task must be enabled; tasks are {list(TASKS)}")

    @staticmethod
    def entry_type(task: TaskDef) -> type:
        return task.config_cls

    def missing(self, task: TaskDef) -> Any:
        return task.config_cls() if task.enabled_when_absent else task.config_cls(enabled=False)


class HarmonizationConfig(TaskSections):
    """harmonization.<name>: feed Lab L replicated x3 (true) or the task's own RGB
    preprocessing (false); absent: the task's default (TaskDef.harmonize)."""
    key = "harmonization"

    @staticmethod
    def entry_type(task: TaskDef) -> type:
        return bool

    def missing(self, task: TaskDef) -> Any:
        return task.harmonize

    def check(self, task: TaskDef, value: Any) -> None:
        require(value or task.harmonize_required is None, task.name,
                f"{task.harmonize_required}; it cannot be switched off")
