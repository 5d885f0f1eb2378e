"""One writer per run, and no run silently replaced.

`claim_run` runs before any compute: it refuses to start a new run where one exists (naming
`--resume` and `--force`; `--force` moves the old run aside, never deletes it) and refuses any
run whose lock is held by a live process. `RunLock` is that lock, held while a trainer or
coordinator writes: a lease file in the run directory created with O_EXCL semantics (a hard
link of a complete file, so readers never see a half-written owner), naming the owner's pid,
host and process start time. A lock is stale when its owner is gone: on the same host, the pid
is not running or belongs to a younger process (pid reuse); on another host (a shared volume),
its heartbeat (the file's mtime, refreshed every HEARTBEAT_S) is older than LEASE_S.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from mtssl.errors import UserError
from mtssl.procs import pid_alive, start_time
from mtssl.storage import Storage

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
LEASE_S = 300.0  # ten missed heartbeats: only then is another host's lock taken over
# Files that make a directory a run (what a new run would overwrite).
RUN_FILES = ("metrics.jsonl", "config.yaml")
CHECKPOINT_POINTER = "checkpoints/latest"


class RunLocked(UserError):
    """Another live process holds the run's lock."""


class RunExists(UserError):
    """A new run was asked for where a run already exists."""


def read_owner(path: Path) -> dict | None:
    """The lock's owner record; None if there is no lock. A torn or foreign file counts as stale."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
            return owner
    except json.JSONDecodeError:
        pass
    return {"pid": -1, "host": "?", "torn": True}


def owner_alive(path: Path, owner: dict) -> bool:
    if owner.get("torn"):
        return False
    if owner.get("host") == socket.gethostname():
        return pid_alive(owner["pid"], owner.get("start"))
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age < LEASE_S


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since', '?')}, "
            f"command: {owner.get('command', '?')})")


class RunLock:
    """The run directory's lease; use as a context manager around everything that writes."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": start_time(os.getpid()),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["mtssl", *sys.argv[1:]])[:300], "token": self.token}
        tmp = self.run_dir / f".{LOCK_NAME}.{self.token}"
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists
                    break
                except FileExistsError:
                    self._take_over_if_stale()
            else:
                raise RunLocked(f"run directory {self.run_dir} is locked by another process that "
                                "keeps replacing a stale lock; retry")
        finally:
            tmp.unlink(missing_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()

    def _take_over_if_stale(self) -> None:
        owner = read_owner(self.path)
        if owner is None:
            return  # released meanwhile: try again
        if owner_alive(self.path, owner):
            raise RunLocked(f"run directory {self.run_dir} is in use by {describe(owner)}; two "
                            "processes must never write one run. Stop that process first "
                            f"(its lock is {self.path})")
        # Rename rather than delete: of two processes seeing the same stale lock, one wins.
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_owner(aside) != owner:  # replaced by a live owner between our read and rename
            os.rename(aside, self.path)
            raise RunLocked(f"run directory {self.run_dir} was locked just now by another process")
        aside.unlink(missing_ok=True)
        log.warning("taking over the stale lock of %s: that process is gone", describe(owner))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        owner = read_owner(self.path)
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(run_dir: Path) -> None:
    """Raise RunLocked if a live process holds the run's lock (does not take it)."""
    path = Path(run_dir) / LOCK_NAME
    owner = read_owner(path)
    if owner is not None and owner_alive(path, owner):
        raise RunLocked(f"run directory {run_dir} is in use by {describe(owner)}; two processes "
                        "must never write one run. Stop that process first")


def existing_run(run_dir: Path, storage: Storage) -> list[str]:
    """What of a run is already there (empty: nothing a new run would overwrite)."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if storage.exists(CHECKPOINT_POINTER):
        found.append(f"checkpoints ({storage.uri(CHECKPOINT_POINTER).rsplit('/', 1)[0]})")
    return found


def aside_name(path: Path, stamp: str) -> Path:
    return path.with_name(f"{path.name}.old-{stamp}")


def move_aside(run_dir: Path, storage: Storage, stamp: str) -> str:
    """Rename the run directory to `<dir>.old-<stamp>`; checkpoints stored elsewhere move under
    `previous-<stamp>/` in their storage (copied and verified before each original goes)."""
    moved = []
    if run_dir.exists():
        target = aside_name(run_dir, stamp)
        os.rename(run_dir, target)
        moved.append(str(target))
    # Storage inside the run directory moved with it; anything still there lives elsewhere.
    keys = storage.list("checkpoints/")
    if keys:
        dest = f"previous-{stamp}"
        for key in keys:
            data = storage.get_bytes(key)
            storage.put_bytes(f"{dest}/{key}", data)
            if storage.get_bytes(f"{dest}/{key}") != data:
                raise UserError(f"moving {storage.uri(key)} aside: the copy differs; nothing "
                                "was deleted")
            storage.delete(key)
        moved.append(storage.uri(dest))
    return " and ".join(moved)


def claim_run(run_dir: Path, storage: Storage, *, resume: bool, force: bool) -> None:
    """Before any compute: no live writer, and no existing run replaced unless asked to.

    `force` moves an existing run aside (see `move_aside`); `resume` continues it.
    """
    check_unlocked(run_dir)
    if resume:
        return
    found = existing_run(run_dir, storage)
    if not found:
        return
    if not force:
        raise RunExists(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                        "--resume, or start a new one there with --force (moves the old run "
                        "aside to <dir>.old-<time>, deletes nothing)")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log.warning("--force: moved the previous run aside to %s", move_aside(run_dir, storage, stamp))
