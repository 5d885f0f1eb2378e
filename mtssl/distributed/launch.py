"""`mtssl launch --local`: the coordinator and every worker as local processes.

Each role runs the same `mtssl` command, with the same environment variables, as its pod does
(see `roles`). Output is interleaved line by line with a role prefix. Ctrl-C, SIGTERM or SIGHUP
(a closed terminal) asks the coordinator to stop (it tells the workers, then checkpoints);
whatever still runs after a grace period is terminated. If any role fails, the others get the
same grace period to stop on their own (the coordinator notices a lost worker at once; workers
notice a lost coordinator at once, or after distributed.timeout_s at worst). The exit status is
non-zero if any role failed.

Nothing outlives the launcher: the roles share one process group, and on Linux each gets
SIGTERM from the kernel when the launcher dies, even by SIGKILL (PR_SET_PDEATHSIG; the
coordinator then checkpoints). The roles' pids are recorded in the run directory
(LAUNCH_RECORD), so a relaunch finds and reports any leftovers of an earlier launch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mtssl import env as envvars
from mtssl.config import Config
from mtssl.distributed.protocol import role_name, task_ranks
from mtssl.errors import UserError
from mtssl.procs import die_with_parent, libc_prctl, pid_alive, start_time

STOP_GRACE_S = 30.0  # after Ctrl-C: time for the coordinator's final checkpoint
KILL_GRACE_S = 5.0  # after SIGTERM: time before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LAUNCH_RECORD = "launch.json"


class Leftovers(UserError):
    """Roles of an earlier launch of the same run are still running."""


def child_setup(pgid_holder: list[int], parent: int, prctl):
    """preexec_fn of a role: join the launch's process group, die with the launcher."""
    def setup() -> None:
        os.setpgid(0, pgid_holder[0] if pgid_holder else 0)
        if prctl is not None:
            die_with_parent(parent, prctl)
    return setup


def record_launch(run_dir: Path, procs: dict[str, subprocess.Popen]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"launcher": os.getpid(), "host": socket.gethostname(),
              "pgid": os.getpgid(next(iter(procs.values())).pid),
              "roles": {name: {"pid": p.pid, "start": start_time(p.pid)}
                        for name, p in procs.items()}}
    tmp = run_dir / f".{LAUNCH_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / LAUNCH_RECORD)


def check_leftovers(run_dir: Path) -> None:
    """Raise Leftovers if roles recorded by an earlier launch of this run still run here."""
    path = run_dir / LAUNCH_RECORD
    try:
        record = json.loads(path.read_text())
        roles_, host = record["roles"], record["host"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        return  # a torn record names no process we could check
    if host != socket.gethostname():
        return
    alive = [f"{name} (pid {r['pid']})" for name, r in roles_.items()
             if pid_alive(r["pid"], r.get("start"))]
    if alive:
        raise Leftovers(f"an earlier launch of this run is still running: {', '.join(alive)}; "
                        f"stop it with: kill -TERM -{record.get('pgid')} (the coordinator writes "
                        "a final checkpoint), then relaunch with --resume")


@dataclass(frozen=True)
class Role:
    name: str  # coordinator, or task/index
    args: list[str]  # the mtssl command line, without the program
    env: dict[str, str] = field(default_factory=dict)  # the MTSSL_* variables of this role
    rank: int = 0


def config_args(config: str, overrides: list[str]) -> list[str]:
    return ["--config", config] + [a for o in overrides for a in ("--set", o)]


def roles(cfg: Config, *, config: str, overrides: list[str], addr: str, port: int, run: str,
          metrics_base: int, resume: bool = False, allow_changed: tuple[str, ...] = ()
          ) -> list[Role]:
    """The processes of a run: the coordinator (rank 0), then each task's workers in rank order.

    Metrics ports: metrics_base + rank when metrics_base is set, else 0 (off) for every role.
    """
    common = config_args(config, overrides)
    start = (["--resume"] if resume else []) + (
        ["--allow-changed", ",".join(allow_changed)] if allow_changed else [])
    out = [Role("coordinator", ["coordinator", *common, *start],
                envvars.child_environment(addr=addr, port=port, run=run,
                                          metrics=metrics_base or 0))]
    for task, ranks in task_ranks(cfg).items():
        for index, rank in enumerate(ranks):
            metrics = metrics_base + rank if metrics_base else 0
            out.append(Role(role_name(task, index), ["worker", "--task", task, *common],
                            envvars.child_environment(addr=addr, port=port, run=run,
                                                      metrics=metrics, task=task, index=index),
                            rank))
    return out


class LocalLauncher:
    def __init__(self, roles: list[Role], *, grace_s: float, out: TextIO = sys.stdout,
                 program: list[str] | None = None, run_dir: Path | None = None):
        self.roles, self.grace_s, self.out, self.run_dir = roles, grace_s, out, run_dir
        self.program = program or [sys.executable, "-m", "mtssl.cli"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.codes: dict[str, int] = {}
        self.write_lock = threading.Lock()
        self.width = max(len(r.name) for r in roles)
        self.interrupts = 0

    def say(self, name: str, line: str) -> None:
        with self.write_lock:
            self.out.write(f"[{name:>{self.width}}] {line.rstrip()}\n")
            self.out.flush()

    def pump(self, name: str, stream) -> None:
        for line in stream:
            self.say(name, line)

    def start(self) -> None:
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        # One process per role on a shared machine: split the cores instead of oversubscribing.
        base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.roles))))
        pgid: list[int] = []  # the first role's pid: the group every role joins
        prctl = libc_prctl()  # loaded here: the child between fork and exec only calls it
        for role in self.roles:
            proc = subprocess.Popen([*self.program, *role.args], env={**base, **role.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, preexec_fn=child_setup(pgid, os.getpid(), prctl))
            pgid = pgid or [proc.pid]
            self.procs[role.name] = proc
            threading.Thread(target=self.pump, args=(role.name, proc.stdout), daemon=True).start()
            self.say("launch", f"started {role.name} (pid {proc.pid}, rank {role.rank})")
        self.say("launch", f"commands: mtssl {' '.join(self.roles[0].args)}; "
                           f"mtssl {' '.join(self.roles[-1].args)}; ...")
        if self.run_dir is not None:
            record_launch(self.run_dir, self.procs)

    def on_signal(self, signum, frame) -> None:
        self.interrupts += 1

    def signal_all(self, sig: int, names=None) -> None:
        for name, proc in self.procs.items():
            if (names is None or name in names) and proc.poll() is None:
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        """Supervise until every role has exited; returns the launcher's exit status."""
        deadline = killed_at = None
        seen_interrupts = 0
        while True:
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is not None and name not in self.codes:
                    self.codes[name] = code
                    self.say("launch", f"{name} exited with status {code}")
                    if code != 0 and deadline is None:
                        deadline = time.monotonic() + self.grace_s
            if len(self.codes) == len(self.procs):
                break
            if self.interrupts > seen_interrupts:
                seen_interrupts = self.interrupts
                if seen_interrupts == 1:
                    self.say("launch", "stopping: asking the coordinator to checkpoint and stop "
                                       "(again to kill everything)")
                    self.signal_all(signal.SIGTERM, {"coordinator"})
                    deadline = time.monotonic() + STOP_GRACE_S
                else:
                    self.signal_all(signal.SIGKILL)
            now = time.monotonic()
            if deadline is not None and now > deadline and killed_at is None:
                self.say("launch", "grace period over: terminating the remaining roles")
                self.signal_all(signal.SIGTERM)
                killed_at = now
            if killed_at is not None and now > killed_at + KILL_GRACE_S:
                self.signal_all(signal.SIGKILL)
            time.sleep(0.1)
        for proc in self.procs.values():
            proc.wait()
        if self.run_dir is not None:
            (self.run_dir / LAUNCH_RECORD).unlink(missing_ok=True)
        if all(c == 0 for c in self.codes.values()):
            return 0  # also after a stop request: the coordinator checkpointed and stopped cleanly
        return 130 if self.interrupts else 1

    def run(self) -> int:
        previous = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        try:
            self.start()
            return self.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
