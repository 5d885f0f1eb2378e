"""Stop requests from signals: the first asks for a clean stop, a later second one interrupts,
and the same signal delivered twice at once (the kernel's parent-death signal, re-sent as a
multi-threaded parent's threads die one by one) counts once."""

import os
import signal

import pytest

from mtssl import signals
from mtssl.signals import StopOnSignal


def test_a_duplicate_signal_counts_once_and_a_later_second_one_interrupts(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    requests = []
    with StopOnSignal() as stop:
        stop.bind(requests.append)
        os.kill(os.getpid(), signal.SIGTERM)
        clock[0] += 0.01
        os.kill(os.getpid(), signal.SIGTERM)  # the same request again: ignored
        assert requests == ["SIGTERM received"] and stop.stopped
        clock[0] += 5.0
        with pytest.raises(KeyboardInterrupt, match="second signal"):
            os.kill(os.getpid(), signal.SIGINT)
