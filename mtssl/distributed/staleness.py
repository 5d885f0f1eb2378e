"""Bounded staleness for asynchronous rounds: when a task may start computing a gradient.

Versions count applied updates. A task's round is "in flight" from the moment it reads the
parameters (version v) until its update is applied; its staleness is the number of updates
applied in between. Every in-flight task applies exactly once, so the worst staleness task u
can still reach is (version - v_u) + (other tasks in flight). The gate keeps that at most
`max_staleness` for every in-flight task: it is checked when a round starts (it cannot grow
later: an update adds one to the first term and removes one from the second). Applying is never
blocked, so in-flight rounds always finish and a waiting start is granted at the latest when
nothing is in flight: no deadlock. Starts are granted first come first served, so a fast task
cannot starve a slow one. max_staleness 0 serialises the tasks; n_tasks - 1 lets equally fast
tasks run without waiting; a slow task holds a fast one to max_staleness updates per own update.
"""

from __future__ import annotations

import threading
from collections import deque


class StalenessGate:
    """Thread-safe admission of task rounds; also caps the total number of rounds started."""

    def __init__(self, *, max_staleness: int, rounds_left: int, version: int = 0):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.rounds_left = rounds_left
        self.version = version
        self.in_flight: dict[str, int] = {}  # task -> version its parameters were read at
        self.queue: deque[str] = deque()
        self.stopped = False
        self.cond = threading.Condition()

    def admissible(self, task: str) -> bool:
        """Would starting `task` now keep every in-flight task within the bound? (lock held)"""
        worst = max((self.version - v for v in self.in_flight.values()), default=0)
        return worst + len(self.in_flight) <= self.max_staleness and task not in self.in_flight

    def start(self, task: str, *, timeout: float | None = None) -> int | None:
        """Block until `task` may start; returns the version it reads, None once stopping."""
        with self.cond:
            self.queue.append(task)
            try:
                ok = self.cond.wait_for(
                    lambda: self.stopped or self.rounds_left <= 0
                    or (self.queue[0] == task and self.admissible(task)), timeout=timeout)
                if not ok:
                    raise TimeoutError(f"task {task!r} waited {timeout}s to start a round")
                if self.stopped or self.rounds_left <= 0:
                    return None
                self.rounds_left -= 1
                self.in_flight[task] = self.version
                return self.version
            finally:
                self.queue.remove(task)
                self.cond.notify_all()

    def finish(self, task: str) -> int:
        """Record `task`'s update as applied; returns its staleness. Call with the update applied."""
        with self.cond:
            staleness = self.version - self.in_flight.pop(task)
            self.version += 1
            self.cond.notify_all()
            return staleness

    def abandon(self, task: str) -> None:
        """A round that will never be applied (its group failed)."""
        with self.cond:
            self.in_flight.pop(task, None)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
