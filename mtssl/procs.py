"""Is a recorded process still the one that ran? (run locks, launch records, prep temp files)"""

from __future__ import annotations

import os
from pathlib import Path


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
