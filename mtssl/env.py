"""The environment of a process: the one place mtssl reads its own environment variables.

Pods get these from their spec; `mtssl launch --local` sets them for the processes it starts.

- MTSSL_COORDINATOR_ADDR: host of the coordinator (rank 0, the rendezvous point); on
  Kubernetes its Service name. Default 127.0.0.1.
- MTSSL_COORDINATOR_PORT: its rendezvous port. Default: config distributed.port.
- MTSSL_TASK: a worker's task (alternative to --task).
- MTSSL_WORKER_INDEX: a worker's 0-based index within its task (alternative to --index); on
  Kubernetes the PyTorchJob replica index. May be left out only when the task has one worker.
- MTSSL_RUN: the run label on every metric. Default: config name.
- MTSSL_METRICS_PORT: Prometheus port of this process (0 = off). Default: config metrics.port.
- MTSSL_DEVICE: a worker's device, overriding config device (auto | cpu | cuda | cuda:N);
  the coordinator keeps its state in host memory.
- MTSSL_S3_ENDPOINT, MTSSL_S3_ACCESS_KEY, MTSSL_S3_SECRET_KEY, MTSSL_S3_SECURE,
  MTSSL_S3_REGION, MTSSL_S3_RETRY_S: how to reach S3 (S3_VARS; mtssl.storage validates them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtssl.validation import ConfigError

if TYPE_CHECKING:  # only a type here: config.py imports this module (low in the order)
    from mtssl.config import Config

ADDR = "MTSSL_COORDINATOR_ADDR"
PORT = "MTSSL_COORDINATOR_PORT"
TASK = "MTSSL_TASK"
INDEX = "MTSSL_WORKER_INDEX"
RUN = "MTSSL_RUN"
METRICS_PORT = "MTSSL_METRICS_PORT"
DEVICE = "MTSSL_DEVICE"
DEFAULT_ADDR = "127.0.0.1"
# The S3 settings: short name (also the key in the pods' Secret) -> variable. Pods get the
# first five from the Secret (k8s.builders, the pipeline); S3_OPTIONAL may be absent from it.
S3_VARS = {"endpoint": "MTSSL_S3_ENDPOINT", "access-key": "MTSSL_S3_ACCESS_KEY",
           "secret-key": "MTSSL_S3_SECRET_KEY", "secure": "MTSSL_S3_SECURE",
           "region": "MTSSL_S3_REGION", "retry-s": "MTSSL_S3_RETRY_S"}
S3_SECRET_KEYS = ("endpoint", "access-key", "secret-key", "secure", "region")
S3_OPTIONAL = ("secure", "region")
DEVICES = "auto, cpu, cuda or cuda:N"


class EnvError(ConfigError):
    """A missing or malformed environment variable (the CLI exits 2, as for config errors)."""

    def __init__(self, name: str, message: str):
        ValueError.__init__(self, f"environment variable {name}: {message}")
        self.key = name


@dataclass(frozen=True)
class RoleEnv:
    addr: str
    port: int
    run: str
    metrics_port: int
    device: str
    task: str | None = None  # workers only
    index: int | None = None


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvError(name, f"expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise EnvError(name, f"must be in [{low}, {high}], got {value}")
    return value


def run_name(cfg: Config, environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(RUN, "").strip() or cfg.name


def metrics_port(cfg: Config, environ: Mapping[str, str] = os.environ) -> int:
    return _int(environ, METRICS_PORT, cfg.metrics.port, 0, 65535)


def valid_device(name: str) -> bool:
    """The one check of a device name (config `device`, MTSSL_DEVICE, `--device`)."""
    return name in ("auto", "cpu") or name.startswith("cuda")


def device(cfg: Config, environ: Mapping[str, str] = os.environ) -> str:
    name = environ.get(DEVICE, "").strip() or cfg.device
    if not valid_device(name):
        raise EnvError(DEVICE, f"must be {DEVICES}, got {name!r}")
    return name


def s3_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The S3 settings that are set, by short name (S3_VARS), values as written."""
    env = os.environ if environ is None else environ
    return {key: env[var] for key, var in S3_VARS.items() if var in env}


def role_env(cfg: Config, *, task: str | None = None, index: int | None = None,
             worker: bool = False, environ: Mapping[str, str] = os.environ) -> RoleEnv:
    """The coordinator's (worker=False) or a worker's view; CLI flags win over variables."""
    common = RoleEnv(addr=environ.get(ADDR, "").strip() or DEFAULT_ADDR,
                     port=_int(environ, PORT, cfg.distributed.port, 1, 65535),
                     run=run_name(cfg, environ), metrics_port=metrics_port(cfg, environ),
                     device=device(cfg, environ))
    if not worker:
        return common
    task = task or environ.get(TASK, "").strip()
    enabled = cfg.enabled_tasks()
    if not task:
        raise EnvError(TASK, f"no task given: pass --task or set {TASK} to one of {enabled}")
    if task not in enabled:
        raise EnvError(TASK, f"task {task!r} is not an enabled task of this config ({enabled})")
    workers = getattr(cfg.tasks, task).workers
    if index is None:
        if not environ.get(INDEX, "").strip() and workers > 1:
            raise EnvError(INDEX, f"task {task!r} has {workers} workers: each needs its index "
                                  f"(--index or {INDEX}, 0..{workers - 1})")
        index = _int(environ, INDEX, 0, 0, workers - 1)
    elif not 0 <= index < workers:
        raise EnvError(INDEX, f"index {index} out of range: task {task!r} has {workers} workers")
    return dataclasses.replace(common, task=task, index=index)


def child_environment(*, addr: str, port: int, run: str, metrics: int,
                      task: str | None = None, index: int | None = None) -> dict[str, str]:
    """The variables a launcher gives one role: exactly those a pod of that role gets."""
    env = {ADDR: addr, PORT: str(port), RUN: run, METRICS_PORT: str(metrics)}
    if task is not None:
        env[TASK], env[INDEX] = task, str(index)
    return env
