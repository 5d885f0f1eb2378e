"""Faults of a single-process run, each injected for real: a second run into the same directory,
two writers, SIGTERM/SIGINT, a torn log line, bad data folders, bad storage, divergence."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from s3_emulator import SECRET_KEY, FaultyProxy, free_port, s3_bucket, s3_emulator, s3_env  # noqa: F401

from mtssl.checkpoint import CheckpointStore
from mtssl.cli import main
from mtssl.config import ConfigError
from mtssl.runlock import LEASE_S, LOCK_NAME, RunLock, RunLocked, claim_run
from mtssl.storage import LocalStorage, open_storage
from mtssl.train import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def cli_args(command: str, run_dir: Path, *sets: str, extra=()) -> list[str]:
    args = [command, "--config", "quickstart", "--out", str(run_dir), "--no-report", *extra]
    for s in TINY + list(sets):
        args += ["--set", s]
    return args


def run_main(capsys, args) -> tuple[int, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def one_line_error(text: str) -> str:
    """The text's only 'mtssl:' line; fails if a traceback was printed."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("mtssl:")]
    assert len(lines) == 1, text
    return lines[0]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in CheckpointStore(LocalStorage(run_dir)).list_checkpoints()]


# --- a run directory is never overwritten ------------------------------------------------------

def test_second_run_refuses_and_force_moves_the_old_run_aside(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ("schedule.max_steps=4", "output.checkpoint_every=2", "output.log_every=1")
    assert main(cli_args("train", run, *sets)) == 0
    before_log = (run / "metrics.jsonl").read_text()
    assert checkpoint_steps(run) == [2, 4]
    capsys.readouterr()

    code, text = run_main(capsys, cli_args("train", run, *sets))
    line = one_line_error(text)
    assert code == 2 and "--resume" in line and "--force" in line
    assert (run / "metrics.jsonl").read_text() == before_log  # nothing truncated
    assert checkpoint_steps(run) == [2, 4]  # nothing deleted

    assert main(cli_args("train", run, "schedule.max_steps=1", extra=["--force"])) == 0
    [old] = tmp_path.glob("run.old-*")
    assert (old / "metrics.jsonl").read_text() == before_log
    assert checkpoint_steps(old) == [2, 4]
    assert checkpoint_steps(run) == [1]


def test_force_moves_checkpoints_kept_outside_the_run_directory(tiny_config, tmp_path):
    store = tmp_path / "store"
    first = tiny_config("schedule.max_steps=1", f"output.storage={store}")
    Trainer(first).train()
    fresh = tiny_config("schedule.max_steps=1", f"output.storage={store}", run="other")
    with pytest.raises(Exception, match="--force"):
        Trainer(fresh)  # a new run directory, but the storage already holds a run
    Trainer(fresh, force=True)
    moved = [k for k in LocalStorage(store).list() if k.startswith("previous-")]
    assert any(k.endswith("checkpoints/latest") for k in moved)
    assert not LocalStorage(store).exists("checkpoints/latest")


LOCK_HOLDER = "from mtssl.runlock import RunLock; import sys, time; " \
              "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"


def test_a_live_lock_refuses_a_second_writer_and_a_dead_one_is_taken_over(tiny_config, caplog):
    cfg = tiny_config("schedule.max_steps=1")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(cfg.run_dir)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            Trainer(cfg, resume=True)
        with pytest.raises(RunLocked):
            RunLock(cfg.run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: its lock file stays behind, and is recognised as stale.
    assert (cfg.run_dir / LOCK_NAME).exists()
    assert Trainer(cfg).train().step == 1
    assert "stale lock" in caplog.text
    assert not (cfg.run_dir / LOCK_NAME).exists()  # released at the end


def test_another_hosts_lock_is_a_lease_until_its_heartbeat_stops(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunLocked, match="host elsewhere"):
        claim_run(tmp_path, LocalStorage(tmp_path), resume=True, force=False)
    old = time.time() - LEASE_S - 1
    os.utime(lock, (old, old))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# --- SIGTERM / SIGINT ------------------------------------------------------------------------

def logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_exits_0(tmp_path, sig):
    run = tmp_path / "run"
    args = cli_args("train", run, "schedule.max_steps=100000", "output.log_every=1",
                    "output.checkpoint_every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "mtssl.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 240
        while not logged(run) or logged(run)[-1]["step"] < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert f"stopped by {sig.name}" in out and "--resume" in out
    steps = checkpoint_steps(run)
    # No step lost: the final checkpoint is the last step the log recorded (not step 1000).
    assert steps and steps[-1] == logged(run)[-1]["step"] >= 2
    assert not (run / LOCK_NAME).exists()


# --- resume ------------------------------------------------------------------------------------

def test_resume_survives_a_torn_last_log_line(tiny_config, caplog):
    cfg = tiny_config("schedule.max_steps=2", "output.log_every=1")
    Trainer(cfg).train()
    log = cfg.run_dir / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"step": 3, "lr_scale": 0.9, "tas')  # a crash mid-write
    resumed = Trainer(tiny_config("schedule.max_steps=3", "output.log_every=1"), resume=True)
    assert resumed.train().step == 3
    assert [r["step"] for r in logged(cfg.run_dir)] == [1, 2, 3]
    assert "torn" in caplog.text


def test_a_diverged_run_resumes_only_with_the_changed_keys_named(tiny_config, monkeypatch):
    cfg = tiny_config("schedule.max_steps=4", "output.checkpoint_every=2")
    trainer = Trainer(cfg)
    head = trainer.model.heads["exemplar"]
    original = head.forward

    def diverging(batch, features):
        out = original(batch, features)
        if trainer.state.step >= 2:
            out.loss = out.loss * math.inf
        return out
    monkeypatch.setattr(head, "forward", diverging)
    with pytest.raises(TrainingError, match="task 'exemplar' at step 2"):
        trainer.train()
    lower = tiny_config("schedule.max_steps=4", "output.checkpoint_every=2",
                        "tasks.exemplar.lr=1e-5")
    with pytest.raises(TrainingError, match="tasks.exemplar.lr .*--allow-changed"):
        Trainer(lower, resume=True)
    with pytest.raises(ConfigError, match="trunk.width.*cannot change"):
        Trainer(lower, resume=True, allow_changed=("trunk.width",))
    resumed = Trainer(lower, resume=True, allow_changed=("tasks.exemplar.lr",))
    assert resumed.state.step == 2 and resumed.train().step == 4


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a poisoned update."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_a_non_finite_gradient_is_blamed_on_its_own_task(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config("schedule.max_steps=2"))
    head = trainer.model.heads["colorization"]
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda batch, features: original(
        batch, lambda x: InfGrad.apply(features(x))))
    # colorization runs after relative_position: the next task must not take the blame
    with pytest.raises(TrainingError, match="non-finite gradient .* in task 'colorization'"):
        trainer.train()


# --- preflight: one line, exit 2, before any compute ---------------------------------------

def write_junk_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"junk{i}.jpg").write_bytes(b"not a jpeg at all" * i)


def frames_without_masks(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(folder / f"{i:05d}.jpg")


@pytest.mark.parametrize("case", ["missing", "empty", "unusable", "frames_without_masks"])
def test_bad_data_folders_fail_before_compute_in_one_line(tmp_path, capsys, case):
    data = tmp_path / "data"
    key, sets = "data.images", ["tasks.motion_segmentation.enabled=false"]
    if case == "empty":
        data.mkdir()
    elif case == "unusable":
        write_junk_images(data)
    elif case == "frames_without_masks":
        frames_without_masks(data)
        key, sets = "data.frames", []
    sets.append(f"{key}={data}")
    code, text = run_main(capsys, cli_args("train", tmp_path / "run", *sets))
    line = one_line_error(text)
    assert code == 2 and f"'{key}'" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not list(tmp_path.glob("run/checkpoints/*"))


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code, text = run_main(capsys, ["-v", *cli_args("train", tmp_path / "run",
                                                   f"data.images={tmp_path / 'nowhere'}")])
    assert code == 2 and "Traceback" in text and "mtssl: config key 'data.images'" in text


def test_binary_config_file_is_one_line(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    code, text = run_main(capsys, ["train", "--config", str(binary)])
    assert code == 2 and "not a text" in one_line_error(text)


def test_unwritable_storage_fails_before_compute(tmp_path, capsys):
    # Root ignores permission bits and chattr needs a supporting filesystem; a file where a
    # folder must be refuses every user, root included.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = run_main(capsys, cli_args("train", tmp_path / "run",
                                           f"output.storage={blocker / 'ckpt'}"))
    assert code == 2 and "storage check failed" in one_line_error(text)


def test_no_usable_checkpoint_is_one_line(tiny_config, tmp_path, capsys):
    cfg = tiny_config("schedule.max_steps=1")
    Trainer(cfg).train()
    for ckpt in (cfg.run_dir / "checkpoints").glob("step_*.pt"):
        ckpt.write_bytes(b"torn")
    code, text = run_main(capsys, cli_args("train", cfg.run_dir, "schedule.max_steps=2",
                                           extra=["--resume"]))
    assert code == 1 and "no usable checkpoint" in one_line_error(text)


def test_infinite_and_nan_settings_are_refused_at_load(capsys):
    for value in (".inf", ".nan", "-1", "inf"):
        code, text = run_main(capsys, ["config", "--set", f"tasks.colorization.lr={value}"])
        assert code == 2 and "'tasks.colorization.lr'" in one_line_error(text)


def test_s3_endpoint_unset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MTSSL_S3_ENDPOINT", raising=False)
    code, text = run_main(capsys, cli_args("train", tmp_path / "run", "output.storage=s3://b/r"))
    assert code == 2 and "MTSSL_S3_ENDPOINT" in one_line_error(text)


# --- preflight of S3 storage (the emulator) ---------------------------------------------------

def s3_train_args(tmp_path, bucket: str, extra=()) -> list[str]:
    return cli_args("train", tmp_path / "run", f"output.storage=s3://{bucket}/run",
                    "schedule.max_steps=1", extra=extra)


def test_missing_bucket_is_refused_before_compute_and_create_bucket_creates_it(
        tmp_path, capsys, s3_bucket):
    code, text = run_main(capsys, s3_train_args(tmp_path, s3_bucket))
    assert code == 2 and "--create-bucket" in one_line_error(text)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(s3_train_args(tmp_path, s3_bucket, extra=["--create-bucket"])) == 0
    assert CheckpointStore(open_storage(f"s3://{s3_bucket}/run")).load_latest()[1] == 1


def test_wrong_credentials_are_one_line_without_secrets(tmp_path, capsys, s3_emulator, s3_bucket,
                                                       monkeypatch):
    with FaultyProxy(s3_emulator.endpoint, failures=1000, status=403) as proxy:
        monkeypatch.setenv("MTSSL_S3_ENDPOINT", proxy.endpoint)
        code, text = run_main(capsys, s3_train_args(tmp_path, s3_bucket))
    line = one_line_error(text)
    assert code == 2 and "AccessDenied" in line and SECRET_KEY not in text


def test_unreachable_endpoint_fails_after_the_configured_retry_window(tmp_path, capsys, s3_env,
                                                                      s3_bucket, monkeypatch,
                                                                      caplog):
    monkeypatch.setenv("MTSSL_S3_ENDPOINT", f"127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MTSSL_S3_RETRY_S", "2")
    t0 = time.monotonic()
    code, text = run_main(capsys, s3_train_args(tmp_path, s3_bucket))
    assert code == 2 and "storage check failed" in one_line_error(text)
    # Retried within the window (the backoff's jitter decides how many times), then gave up.
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2 and all("of 2s" in r.getMessage() for r in retries)
    assert time.monotonic() - t0 < 30
