"""Processes: is a recorded one still the one that ran (run locks, launch records, prep temp
files), and children that die with their parent (launched roles, prep's worker processes)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def libc_prctl():
    """libc's prctl (Linux), None elsewhere. Load it before fork when a child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int, prctl=None) -> None:
    """This process gets SIGTERM from the kernel when its parent dies, even by SIGKILL; if the
    parent `parent` is already gone, it goes now. Linux only; elsewhere nothing happens."""
    prctl = prctl or libc_prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces, so count from its closing ')'.
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks (Linux), None where unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs on this host and, if `start` is given, is the process that had it.

    A zombie (exited, not yet reaped by its parent) does not run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    fields = _stat(pid)
    if fields is None:
        return True
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)
