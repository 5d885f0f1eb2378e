"""`mtssl launch --local`: the coordinator and every worker as local processes.

Each role runs the same `mtssl` command, with the same environment variables, as its pod does
(see `roles`). Output is interleaved line by line with a role prefix. Ctrl-C or SIGTERM asks the
coordinator to stop (it tells the workers, then checkpoints); whatever still runs after a grace
period is terminated. If any role fails, the others get the same grace period to stop on their
own (the coordinator notices a lost worker at once; workers notice a lost coordinator at once,
or after distributed.timeout_s at worst). The exit status is non-zero if any role failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from mtssl.config import Config
from mtssl.distributed import env as envvars
from mtssl.distributed.protocol import role_name, task_ranks

STOP_GRACE_S = 30.0  # after Ctrl-C: time for the coordinator's final checkpoint
KILL_GRACE_S = 5.0  # after SIGTERM: time before SIGKILL


@dataclass(frozen=True)
class Role:
    name: str  # coordinator, or task/index
    args: list[str]  # the mtssl command line, without the program
    env: dict[str, str] = field(default_factory=dict)  # the MTSSL_* variables of this role
    rank: int = 0


def config_args(config: str, overrides: list[str]) -> list[str]:
    return ["--config", config] + [a for o in overrides for a in ("--set", o)]


def roles(cfg: Config, *, config: str, overrides: list[str], addr: str, port: int, run: str,
          metrics_base: int, resume: bool = False) -> list[Role]:
    """The processes of a run: the coordinator (rank 0), then each task's workers in rank order.

    Metrics ports: metrics_base + rank when metrics_base is set, else 0 (off) for every role.
    """
    common = config_args(config, overrides)
    out = [Role("coordinator", ["coordinator", *common, *(["--resume"] if resume else [])],
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
                 program: list[str] | None = None):
        self.roles, self.grace_s, self.out = roles, grace_s, out
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
        for role in self.roles:
            proc = subprocess.Popen([*self.program, *role.args], env={**base, **role.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, start_new_session=True)
            self.procs[role.name] = proc
            threading.Thread(target=self.pump, args=(role.name, proc.stdout), daemon=True).start()
            self.say("launch", f"started {role.name} (pid {proc.pid}, rank {role.rank})")
        self.say("launch", f"commands: mtssl {' '.join(self.roles[0].args)}; "
                           f"mtssl {' '.join(self.roles[-1].args)}; ...")

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
        if self.interrupts:
            return 130
        return 0 if all(c == 0 for c in self.codes.values()) else 1

    def run(self) -> int:
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            return self.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
