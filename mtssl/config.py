"""Experiment configuration: YAML into frozen dataclasses, strict keys, dotted overrides.

Every section is a frozen dataclass; loading checks keys, types and ranges and raises
`ConfigError` naming the dotted key and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from mtssl.env import DEVICES, valid_device
from mtssl.task_sections import HarmonizationConfig, TasksConfig, TaskSections
from mtssl.validation import ConfigError, require

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "to_dict", "save_config"]


# The sections that define the model and its samples: every role of a distributed run must
# agree on them (the workers' fingerprint), and a resumed run keeps them (mtssl.resume adds the
# optimizer).
MODEL_SECTIONS = ("seed", "trunk", "tasks", "lasso", "harmonization")
# Of the data section, what decides which samples a worker draws (checked with the model's
# sections); loader settings (num_workers, image_cache) may differ between roles.
SHARED_DATA_KEYS = ("images", "frames", "holdout_every", "shared_draws")

# ResNet-v2 units per block for blocks 1-3 (block 4 is not part of pre-training).
DEPTH_UNITS: dict[int, tuple[int, int, int]] = {
    26: (2, 2, 2),
    50: (3, 4, 6),
    101: (3, 4, 23),
    152: (3, 8, 36),
}


@dataclass(frozen=True)
class TrunkConfig:
    depth: int = 101
    units: tuple[int, int, int] | None = None  # overrides depth: units in blocks 1-3
    width: float = 1.0
    output_stride: Literal[8, 16] = 8
    norm: Literal["batch", "group"] = "batch"
    # bf16: autocast of the trunk's and heads' forward (losses, colour targets in fp32); fp32: none
    precision: Literal["fp32", "bf16"] = "fp32"
    # NHWC memory layout for the trunk: measured faster on the CPU (benchmarks/gpu_step.py)
    channels_last: bool = False
    # torch.compile the trunk's forward (in place: parameter names unchanged); each input shape
    # compiles once, at the first step that sees it
    compile: bool = False

    def __post_init__(self):
        require(self.precision in ("fp32", "bf16"), "precision",
                f"must be 'fp32' or 'bf16', got {self.precision!r}")
        require(self.units is not None or self.depth in DEPTH_UNITS, "depth",
                f"must be one of {sorted(DEPTH_UNITS)} (or set units), got {self.depth}")
        require(self.units is None or all(u >= 1 for u in self.units), "units",
                f"every block needs at least one unit, got {self.units}")
        require(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")


@dataclass(frozen=True)
class LassoConfig:
    mode: Literal["lasso", "naive"] = "lasso"
    l1: float = 1e-3  # weight of sum |alpha| added to each task's loss

    def __post_init__(self):
        require(self.l1 >= 0, "l1", f"must be >= 0, got {self.l1}")


@dataclass(frozen=True)
class OptimizerConfig:
    """RMSProp hyper-parameters shared by the per-task optimizers (learning rates are per task)."""
    decay: float = 0.9
    momentum: float = 0.9
    eps: float = 1e-3
    weight_decay: float = 1e-4

    def __post_init__(self):
        require(0 <= self.decay < 1, "decay", f"must be in [0, 1), got {self.decay}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int = 1000
    time_budget_s: float | None = None  # stop (with a checkpoint) when wall time exceeds this
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s",
                f"must be > 0 or null, got {self.time_budget_s}")
        require(0 <= self.warmup_steps, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
                f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class DataConfig:
    # 'embedded' (real photos bundled in scikit-image), a folder of images, or a dataset written
    # by `mtssl prep` (path or s3:// URI)
    images: str = "embedded"
    # 'embedded' (synthetic clips from those photos), a folder of frames with masks beside them,
    # or a dataset written by `mtssl prep`
    frames: str = "embedded"
    num_workers: int = 0  # DataLoader processes per task (0: sampling in the training process)
    image_cache: int = 256  # decoded images kept per loader process (0 = off)
    # Tasks reading one source kind pick the item of batch b's slot j from one shared pick
    # stream (each keeps its own augmentations), and a single process draws their steps
    # together, decoding each shared item once. On by default, as measured (2026-12-06,
    # benchmarks/shared_decode.py, quickstart samplers, one core): 0.33-0.41x the decodes and
    # 1.1x the samples/s on caltech photos, 1.3-1.4x on 480x360-854x480 ones; 100-step loss
    # curves on caltech match private draws' within the seed-to-seed spread. Off: each task
    # draws its own items (the samples of runs before the switch).
    shared_draws: bool = True
    # One source item in this many is held out of training for the learning-health checks
    # (0: none; the checks then draw from the training items and say so).
    holdout_every: int = 50

    def __post_init__(self):
        require(self.holdout_every == 0 or self.holdout_every >= 2, "holdout_every",
                f"must be 0 (off) or >= 2, got {self.holdout_every}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.image_cache >= 0, "image_cache", f"must be >= 0, got {self.image_cache}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/{name}"  # local folder for logs and the report; '{name}' -> config name
    storage: str | None = None  # where checkpoints go: path, file:// or s3:// URI; default: dir
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    report: bool = True
    progress: bool = True

    def __post_init__(self):
        require(self.checkpoint_every >= 1, "checkpoint_every",
                f"must be >= 1, got {self.checkpoint_every}")
        require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class DistributedConfig:
    """Coordinator + per-task worker pools (`mtssl launch`); tasks.<t>.workers sizes each pool."""
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 4  # async: how many parameter versions a task's gradient may lag
    # gloo only: the coordinator keeps the canonical parameters in host memory and serves the
    # task groups concurrently from threads, which NCCL does not support (workers still use GPUs)
    backend: Literal["gloo"] = "gloo"
    port: int = 29500  # the coordinator's rendezvous port
    timeout_s: float = 300.0  # a dead or silent peer stops the run after this, never hangs it
    checkpoint_every_s: float | None = None  # coordinator also checkpoints on this wall clock

    def __post_init__(self):
        require(self.max_staleness >= 0, "max_staleness", f"must be >= 0, got {self.max_staleness}")
        require(0 < self.port < 65536, "port", f"must be a TCP port, got {self.port}")
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.checkpoint_every_s is None or self.checkpoint_every_s > 0,
                "checkpoint_every_s", f"must be > 0 or null, got {self.checkpoint_every_s}")


@dataclass(frozen=True)
class BudgetConfig:
    """Device-hours (GPUs x hours; a CPU process counts as one `cpu` device) for the whole run."""
    gpu_hours: float | None = None  # stop with a final checkpoint when reached

    def __post_init__(self):
        require(self.gpu_hours is None or self.gpu_hours > 0, "gpu_hours",
                f"must be > 0 or null, got {self.gpu_hours}")


@dataclass(frozen=True)
class MilestonesConfig:
    every_gpu_hours: float | None = None  # named checkpoints for the evaluation curves

    def __post_init__(self):
        require(self.every_gpu_hours is None or self.every_gpu_hours > 0, "every_gpu_hours",
                f"must be > 0 or null, got {self.every_gpu_hours}")


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 0  # Prometheus metrics HTTP port of each process; 0 = not served
    host: str = "0.0.0.0"

    def __post_init__(self):
        require(0 <= self.port < 65536, "port", f"must be 0 (off) or a TCP port, got {self.port}")


@dataclass(frozen=True)
class HealthConfig:
    """Learning-health checks at each log step (mtssl/health.py)."""
    enabled: bool = True
    samples: int = 64  # held-out samples per task (at most 8 of the task's batches)
    margin: float = 0.02  # a pretext metric within this of chance counts as chance
    grace_fraction: float = 0.25  # of max_steps before "still at chance" is flagged
    min_effective_rank: float = 1.5  # of pooled trunk features; below it: rank collapse

    def __post_init__(self):
        require(self.samples >= 2, "samples", f"must be >= 2, got {self.samples}")
        require(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        require(0 <= self.grace_fraction <= 1, "grace_fraction",
                f"must be in [0, 1], got {self.grace_fraction}")
        require(self.min_effective_rank >= 0, "min_effective_rank",
                f"must be >= 0, got {self.min_effective_rank}")


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Modules that register tasks of their own when imported (a TaskDef outside mtssl.tasks);
    # imported before the task sections are read, here and in every process of a run.
    task_modules: tuple[str, ...] = ()
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    lasso: LassoConfig = field(default_factory=LassoConfig)
    harmonization: HarmonizationConfig = field(default_factory=HarmonizationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    milestones: MilestonesConfig = field(default_factory=MilestonesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self):
        require(valid_device(self.device), "device", f"must be {DEVICES}, got {self.device!r}")

    def enabled_tasks(self) -> list[str]:
        return [name for name, task in self.tasks.items() if task.enabled]

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))

    @property
    def storage_uri(self) -> str:
        return (self.output.storage or str(self.run_dir)).replace("{name}", self.name)


# --- loading -------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        item_types = args if (len(args) != 2 or args[1] is not Ellipsis) else (args[0],) * len(value)
        if len(item_types) != len(value):
            raise ConfigError(key, f"expected a list of {len(item_types)} items, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if isinstance(tp, type) and issubclass(tp, TaskSections):
        return tp.from_data(value, key, _coerce)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        # No setting means infinity or NaN (YAML's .inf / .nan); "no limit" is null.
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of {[f.name for f in dataclasses.fields(cls)]}, "
                                  f"got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key; valid keys here are: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        key = ".".join(p for p in (prefix, err.key) if p)
        raise ConfigError(key, str(err).split("': ", 1)[-1]) from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able data (tuples become lists) for saving and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, TaskSections):
        return {name: to_dict(value) for name, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def builtin_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mtssl.configs").iterdir()
                  if p.name.endswith(".yaml"))


def read_yaml(source: str | Path) -> dict:
    """A path to a YAML file, or the name of a built-in config (quickstart, paper, ...)."""
    path = Path(source)
    if not path.suffix and not path.exists():
        names = builtin_configs()
        if str(source) not in names:
            raise ConfigError("", f"no config file {source!r} and no built-in config of that name; "
                                  f"built-in: {', '.join(names)}")
        text = resources.files("mtssl.configs").joinpath(f"{source}.yaml").read_text()
    else:
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError("", f"cannot read config file {source}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("", f"{source} is not a text (YAML) file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"{source} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{source} must hold a mapping at the top level")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.c=value` sets data['a']['b']['c'] to value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError("", f"override {assignment!r} must look like key.path=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse value {raw!r}: {err}") from None


def load_config(source: str | Path = "quickstart", overrides: list[str] | tuple[str, ...] = ()
                ) -> Config:
    data = read_yaml(source)
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def from_dict(data: dict) -> Config:
    if isinstance(data, dict):
        import_task_modules(_coerce(data.get("task_modules", []), tuple[str, ...], "task_modules"))
    return build(Config, data)


def import_task_modules(modules: tuple[str, ...]) -> None:
    """Import the modules that register a config's own tasks (a plugin's TaskDef)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError("task_modules", f"cannot import {module!r}: {err}") from None


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
