"""SIGTERM (what Kubernetes sends before killing a pod) and SIGINT (Ctrl-C) as stop requests.

The first signal asks the run to stop after the step in flight and write a final checkpoint;
the process then exits 0 with the resume command. A second signal interrupts at once
(KeyboardInterrupt), for when the user does not want to wait for the checkpoint; one within
DUPLICATE_S of the first is the same request delivered twice and is ignored: the kernel sends
PR_SET_PDEATHSIG's signal again each time a child is handed from one dying thread of its
multi-threaded parent (the launcher) to the next (seen in tests/test_distributed_faults.py).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_S = 1.0  # a person's second Ctrl-C comes later than this


class StopOnSignal:
    """Context manager: routes STOP_SIGNALS to a stop request while active (main thread only).

    `bind(request)` names what to call; a signal that came before it is passed on at binding,
    so one arriving while the run is still being built is not lost.
    """

    def __init__(self):
        self.request: Callable[[str], None] | None = None
        self.received: list[str] = []
        self._first_at: float | None = None
        self._previous: dict[int, object] = {}

    def bind(self, request: Callable[[str], None]) -> None:
        self.request = request
        if self.received:
            request(f"{self.received[0]} received")

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at < DUPLICATE_S:
            return
        self._first_at = self._first_at if self._first_at is not None else now
        self.received.append(name)
        if len(self.received) > 1:
            raise KeyboardInterrupt(f"second signal ({name}): stopping without a final checkpoint")
        if self.request is not None:
            self.request(f"{name} received")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def stopped(self) -> bool:
        return bool(self.received)
