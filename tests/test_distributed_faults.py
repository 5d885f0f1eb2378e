"""Faults of `mtssl launch --local`: stop signals, a killed launcher, leftovers, two coordinators."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from test_distributed import SYNC, Launch, launches, logged_steps, wait_for_step  # noqa: F401

from mtssl.checkpoint import CheckpointStore
from mtssl.cli import main
from mtssl.distributed.launch import LAUNCH_RECORD
from mtssl.procs import pid_alive, start_time
from mtssl.runlock import LOCK_NAME
from mtssl.storage import open_storage

LONG = SYNC + ["schedule.max_steps=100000", "output.checkpoint_every=1000"]


def latest_step(run_dir) -> int | None:
    found = CheckpointStore(open_storage(str(run_dir))).load_latest()
    return found and found[1]


@pytest.mark.parametrize("target", ["coordinator", "launcher"])
def test_sigterm_stops_with_a_final_checkpoint_and_status_0(tmp_path, launches, target):
    run = launches(tmp_path / "run", LONG)
    wait_for_step(run, 2)
    os.kill(run.proc.pid if target == "launcher" else run.pids()["coordinator"], signal.SIGTERM)
    assert run.wait(timeout=90) == 0, run.output
    assert "coordinator exited with status 0" in run.output
    assert latest_step(run.run_dir) == logged_steps(run.run_dir)[-1]["step"] >= 2  # none lost
    assert "--resume" in run.output
    assert not (run.run_dir / LOCK_NAME).exists()


def test_a_killed_launcher_takes_its_roles_with_it(tmp_path, launches):
    run = launches(tmp_path / "run", LONG)
    wait_for_step(run, 2)
    pids = run.pids()
    os.kill(run.proc.pid, signal.SIGKILL)  # no handler runs: only the kernel can tell the roles
    run.wait(timeout=10)
    deadline = time.monotonic() + 60
    while any(pid_alive(p) for p in pids.values()):
        assert time.monotonic() < deadline, f"roles outlived the launcher: {pids}"
        time.sleep(0.2)
    # The coordinator got SIGTERM from the kernel and checkpointed its last step.
    assert latest_step(run.run_dir) == logged_steps(run.run_dir)[-1]["step"], run.output


def test_a_second_launch_on_a_running_run_is_refused(tmp_path, launches, capsys):
    run = launches(tmp_path / "run", LONG)
    wait_for_step(run, 1)
    sets = [a for s in LONG + ["distributed.port=1"] for a in ("--set", s)]  # another port,
    common = ["--config", "quickstart", "--out", str(run.run_dir), "--resume", *sets]  # as hinted
    assert main(["launch", "--local", *common]) == 2
    err = capsys.readouterr().err
    assert "earlier launch of this run is still running" in err and "Traceback" not in err
    assert main(["coordinator", *common]) == 2  # started by hand, or by another launcher
    err = capsys.readouterr().err
    assert f"in use by pid {run.pids()['coordinator']}" in err and "Traceback" not in err
    steps = [r["step"] for r in logged_steps(run.run_dir)]
    assert steps == sorted(set(steps))  # one writer: no duplicated or reordered records


def test_a_relaunch_reports_leftovers_of_an_earlier_launch(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A process recorded as a role of an earlier launch (one whose launcher died on a system
    # without a parent-death signal) and still running.
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / LAUNCH_RECORD).write_text(json.dumps({
            "launcher": 1, "host": socket.gethostname(), "pgid": leftover.pid,
            "roles": {"coordinator": {"pid": leftover.pid, "start": start_time(leftover.pid)}}}))
        code = main(["launch", "--local", "--config", "quickstart", "--out", str(run_dir)])
        err = capsys.readouterr().err
        assert code == 2 and f"coordinator (pid {leftover.pid})" in err
        assert f"kill -TERM -{leftover.pid}" in err
    finally:
        leftover.kill()
        leftover.wait()
