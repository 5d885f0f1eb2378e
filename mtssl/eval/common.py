"""What every evaluation suite shares: the trunk under test (from a checkpoint or random init),
its pre-training GPU-hours, strict suite settings, and the network input.

A checkpoint source is a checkpoint object (`.../checkpoints/step_000000100.pt`, local path or
s3:// URI; verified against its manifest entry), a run directory or a storage root (its newest
verifiable checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mtssl.checkpoint import CheckpointError, CheckpointStore
from mtssl.config import ConfigError, TrunkConfig, apply_override, build, from_dict, load_config, to_dict
from mtssl.data.transforms import network_input
from mtssl.eval import SUITES
from mtssl.models.lasso import one_hot_alpha, unit_coefficients
from mtssl.models.resnet_v2 import DEPTH_UNITS, ResNetV2Trunk
from mtssl.storage import NotFound, StorageError, open_storage

log = logging.getLogger("mtssl.eval")

SETTINGS_NAMES = ("smoke", "paper")


class EvalError(RuntimeError):
    """An evaluation cannot run on this input; the message says what is wrong and where."""


# --- settings --------------------------------------------------------------------------------

def load_settings(cls: type, presets: dict[str, dict], name: str, overrides=(), *,
                  prefix: str) -> object:
    """Preset `name` of a suite's settings dataclass plus `key=value` overrides, loaded strictly."""
    if name not in presets:
        raise ConfigError(prefix, f"unknown settings {name!r}; choose one of {', '.join(presets)}")
    data = copy.deepcopy(presets[name])
    for assignment in overrides:
        apply_override(data, assignment)
    return build(cls, data, prefix)


def settings_digest(settings) -> str:
    """Short stable hash of resolved settings: results with the same digest are the same run."""
    text = json.dumps(to_dict(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_order(n: int, count: int, *, hflip: bool, seed: int) -> list[tuple[int, bool]]:
    """`count` (sample index, flip) draws: whole shuffled passes over n samples, as needed."""
    rng = np.random.default_rng(seed)
    order: list[tuple[int, bool]] = []
    while len(order) < count:
        order += [(int(i), bool(hflip and rng.random() < 0.5)) for i in rng.permutation(n)]
    return order[:count]


def freeze_batch_norm(module: torch.nn.Module) -> None:
    """Fine-tuning a pre-trained trunk with small batches: keep its norm statistics and affine."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def model_input(rgb: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> trunk input in [-1, 1]: RGB, or Lab L x3 for `gray`."""
    return network_input(rgb, harmonize=(mode == "gray"))


# --- the trunk under test --------------------------------------------------------------------

def units_of(arch: TrunkConfig) -> tuple[int, int, int]:
    return tuple(arch.units) if arch.units is not None else DEPTH_UNITS[arch.depth]


def arch_digest(arch: TrunkConfig) -> str:
    key = {"units": list(units_of(arch)), "width": arch.width, "norm": arch.norm}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def describe_arch(arch: TrunkConfig) -> str:
    return f"units {list(units_of(arch))}, width {arch.width}, norm {arch.norm}"


def check_architecture(found: TrunkConfig, expected: TrunkConfig, where: str) -> None:
    """Output stride may differ (same parameters); units, width and norm may not."""
    if arch_digest(found) != arch_digest(expected):
        raise EvalError(f"{where} is a different architecture: its trunk has "
                        f"{describe_arch(found)}, expected {describe_arch(expected)}")


def pretrain_hours(state: dict) -> tuple[float | None, str]:
    """(hours, kind) of pre-training compute behind a checkpoint.

    `device_seconds` (task or "shared" -> seconds, written by mtssl.train) sums to device-hours:
    GPU-hours for a run on GPUs (a CPU process counts as one device). Older checkpoints without
    it fall back to the wall-clock hours of one process."""
    seconds = state.get("device_seconds")
    if isinstance(seconds, dict) and seconds:
        return float(sum(float(v) for v in seconds.values())) / 3600.0, "device_hours"
    if "wall_s" in state:
        return float(state["wall_s"]) / 3600.0, "wall_hours"
    return None, "none"


HOURS_LABELS = {"device_hours": "pre-training device-hours (GPUs x hours; a CPU process = 1)",
                "wall_hours": "pre-training wall-clock hours (no device-hour totals)",
                "none": "pre-training hours unknown"}


@dataclass
class LoadedTrunk:
    """Pre-trained (or random) trunk weights plus what the report needs to place them."""
    arch: TrunkConfig
    weights: dict[str, torch.Tensor]  # ResNetV2Trunk state_dict
    identity: str  # "sha256:<checkpoint digest>" or "random:<arch digest>:seed<seed>"
    label: str
    step: int | None = None
    milestone: str | None = None
    hours: float | None = None
    hours_kind: str = "none"
    lasso_mode: str | None = None
    tasks: tuple[str, ...] = ()
    alpha: np.ndarray | None = None  # (tasks, block-3 units) pre-training lasso coefficients

    @property
    def is_random(self) -> bool:
        return self.identity.startswith("random:")

    def build(self, output_stride: int | None = None) -> ResNetV2Trunk:
        """A fresh trunk module with these weights (suites that fine-tune get their own copy)."""
        a = self.arch
        trunk = ResNetV2Trunk(depth=a.depth, width=a.width, norm=a.norm, units=a.units,
                              output_stride=output_stride or a.output_stride)
        trunk.load_state_dict(self.weights)
        return trunk


def random_trunk(arch: TrunkConfig, *, seed: int = 0) -> LoadedTrunk:
    """The floor baseline: same architecture, default initialisation, fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = ResNetV2Trunk(depth=arch.depth, width=arch.width, norm=arch.norm,
                              units=arch.units, output_stride=arch.output_stride)
    return LoadedTrunk(arch=arch, weights=trunk.state_dict(), label="random init",
                       identity=f"random:{arch_digest(arch)}:seed{seed}", hours=0.0,
                       hours_kind="device_hours")


def trunk_weights(state: dict, arch: TrunkConfig, where: str) -> dict[str, torch.Tensor]:
    """The `trunk.` entries of a MultiTaskNet state, checked key by key against `arch`."""
    model = state["model"]
    weights = {k[len("trunk."):]: v for k, v in model.items() if k.startswith("trunk.")}
    want = ResNetV2Trunk(depth=arch.depth, width=arch.width, norm=arch.norm, units=arch.units,
                         output_stride=arch.output_stride).state_dict()
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(want[k].shape)}"
              for k in want if k in weights and weights[k].shape != want[k].shape]
    if missing or extra or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:2]})" if extra else "",
                 f"shape mismatch {shapes[:2]}" if shapes else ""]
        raise EvalError(f"{where}: trunk weights do not fit the architecture its config describes "
                        f"({describe_arch(arch)}): " + "; ".join(p for p in parts if p))
    return weights


def tasks_of(model: dict) -> list[str]:
    """Pre-training tasks in head order, read from the `heads.<task>.` weights."""
    return list(dict.fromkeys(k.split(".")[1] for k in model if k.startswith("heads.")))


def alpha_of(model: dict, tasks: list[str], num_units: int) -> np.ndarray:
    """(tasks, units) pre-training lasso coefficients as the heads read them (unit norm); naive
    tasks read the last unit only."""
    rows = []
    for t in tasks:
        alpha = model.get(f"mix.{t}.alpha")
        if alpha is None:
            alpha = one_hot_alpha(num_units)
        rows.append(unit_coefficients(alpha.detach().float().cpu()).numpy())
    return np.stack(rows) if rows else np.zeros((0, num_units))


def from_state(state: dict, *, where: str, identity: str, expected: TrunkConfig | None = None,
               step: int | None = None, milestone: str | None = None) -> LoadedTrunk:
    """Only the trunk section of the saved config is loaded (strictly): evaluation does not
    depend on training-only settings, which may have changed since the checkpoint was written."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
            or "model" not in state:
        raise EvalError(f"{where} is not an mtssl pre-training checkpoint (it has no 'config' "
                        "and 'model' entries)")
    try:
        arch = build(TrunkConfig, state["config"].get("trunk"), "trunk")
    except ConfigError as err:
        raise EvalError(f"{where}: its saved trunk config does not load ({err})") from None
    if expected is not None:
        check_architecture(arch, expected, where)
    weights = trunk_weights(state, arch, where)
    hours, kind = pretrain_hours(state)
    step = int(state.get("step", step if step is not None else -1))
    tasks = tasks_of(state["model"])
    lasso = any(k.startswith("mix.") and k.endswith(".alpha") for k in state["model"])
    label = f"{state['config'].get('name', 'run')} step {step}" + (
        f" ({milestone})" if milestone else "")
    return LoadedTrunk(arch=arch, weights=weights, identity=identity, label=label,
                       step=step, milestone=milestone, hours=hours, hours_kind=kind,
                       lasso_mode="lasso" if lasso else "naive", tasks=tuple(tasks),
                       alpha=alpha_of(state["model"], tasks, units_of(arch)[2]))


# --- finding checkpoints ---------------------------------------------------------------------

def run_store(run: str) -> CheckpointStore:
    """Checkpoint store of a storage root (path or URI) or of a run directory whose config.yaml
    names its output.storage."""
    path = Path(run)
    if "://" in run or (path / "checkpoints").is_dir():
        return CheckpointStore(open_storage(run))
    config = path / "config.yaml"
    if config.is_file():
        cfg = from_dict(yaml.safe_load(config.read_text()) or {})
        if cfg.output.storage:  # the run's own config says where ('{name}' substituted)
            return CheckpointStore(open_storage(cfg.storage_uri))
    raise EvalError(f"{run}: not a run directory with checkpoints/ (or with output.storage in its "
                    "config.yaml), and not a storage URI")


def load_entry(store: CheckpointStore, entry: dict, *, expected: TrunkConfig | None = None
               ) -> LoadedTrunk:
    """One manifest entry of a store, verified (sha256) and turned into a LoadedTrunk."""
    state = store.load(entry["key"])
    return from_state(state, where=store.storage.uri(entry["key"]), expected=expected,
                      identity=f"sha256:{entry['sha256']}", step=entry["step"],
                      milestone=entry.get("milestone"))


def newest_entry(store: CheckpointStore, where: str) -> dict:
    entries = store.list_checkpoints()
    if not entries:
        raise EvalError(f"{where}: no checkpoints found")
    return entries[-1]


def load_trunk(source: str, *, expected: TrunkConfig | None = None) -> LoadedTrunk:
    """A checkpoint object (verified against its manifest), a run directory or a storage root."""
    try:
        if not source.endswith(".pt"):
            store = run_store(source)
            for entry in reversed(store.list_checkpoints()):
                try:
                    return load_entry(store, entry, expected=expected)
                except (CheckpointError, NotFound) as err:
                    log.warning("skipping unusable checkpoint: %s", err)
            raise EvalError(f"{source}: no usable checkpoint found")
        if "://" in source and not source.startswith("file://"):
            root, prefix, name = source.rsplit("/", 2)
        else:
            path = Path(source.removeprefix("file://")).resolve()
            if not path.is_file():
                raise EvalError(f"{source}: no such checkpoint file")
            root, prefix, name = str(path.parent.parent), path.parent.name, path.name
            if not (path.parent / "manifest" / (name[:-3] + ".json")).is_file():
                return load_loose_file(path, expected)
        store = CheckpointStore(open_storage(root), prefix=prefix)
        entry = next((e for e in store.list_checkpoints() if e["key"] == f"{prefix}/{name}"), None)
        if entry is None:
            raise EvalError(f"{source}: not a committed checkpoint (no manifest entry)")
        return load_entry(store, entry, expected=expected)
    except (CheckpointError, StorageError) as err:
        raise EvalError(f"cannot load checkpoint {source}: {err}") from None


def load_loose_file(path: Path, expected: TrunkConfig | None) -> LoadedTrunk:
    """A checkpoint file copied out of its store: no manifest, so its own digest identifies it."""
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decode failure means an unusable file
        raise EvalError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: "
                        f"{str(err)[:200]})") from None
    return from_state(state, where=str(path), expected=expected,
                      identity=f"sha256:{hashlib.sha256(data).hexdigest()}")


def suite_settings(suite: str, name: str, overrides=()) -> object:
    """Resolved settings of a suite: preset `name` plus `key=value` overrides (strict)."""
    if suite not in SUITES:
        raise ConfigError("suite", f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    module = importlib.import_module(f"mtssl.eval.{suite}")
    return load_settings(module.SETTINGS, module.PRESETS, name, overrides, prefix=suite)


def run_suite(suite: str, loaded: LoadedTrunk, data: str | Path, settings, *, settings_name: str,
              device: torch.device, cache_dir: Path | None = None) -> dict:
    """One suite's result dict (see result_header for the common fields)."""
    module = importlib.import_module(f"mtssl.eval.{suite}")
    extra = {"cache_dir": cache_dir} if suite == "imagenet" else {}  # only the probe caches
    return module.run(loaded, Path(data), settings, settings_name=settings_name, device=device,
                      **extra)


def arch_from_config(source: str) -> TrunkConfig:
    """The trunk section of a built-in config name or YAML file (for --init random)."""
    import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
    return load_config(source).trunk


def result_header(loaded: LoadedTrunk, suite: str, settings_name: str, settings, data: Path
                  ) -> dict:
    """Fields every suite result starts with: what was evaluated, how, on what."""
    return {"suite": suite, "checkpoint": loaded.identity, "label": loaded.label,
            "step": loaded.step, "milestone": loaded.milestone, "hours": loaded.hours,
            "hours_kind": loaded.hours_kind, "lasso_mode": loaded.lasso_mode,
            "arch": describe_arch(loaded.arch), "arch_config": to_dict(loaded.arch),
            "settings": settings_name,
            "settings_digest": settings_digest(settings),
            "settings_values": dataclasses.asdict(settings), "data": str(Path(data).resolve())}
