"""Cluster profiles: the runs behind manifests/overlays/<profile>, also `mtssl launch --k8s
--profile NAME`. Each is a built-in config plus the overrides a cluster needs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mtssl.tasks  # noqa: F401  registers the tasks whose sections the config holds
from mtssl.config import load_config, read_yaml
from mtssl.k8s.builders import SCRATCH_DIR, Resources, RunSpec
from mtssl.validation import ConfigError

# Every pod: logs on scratch, checkpoints in the bucket (they must outlive pods), no tqdm bars.
CLUSTER_OVERRIDES = (f"output.dir={SCRATCH_DIR}/runs/{{name}}",
                     "output.storage=s3://mtssl/runs/{name}", "output.progress=false")


@dataclass(frozen=True)
class Profile:
    description: str
    config: str
    overrides: tuple[str, ...]
    worker: Resources = field(default_factory=Resources)
    coordinator: Resources = field(default_factory=Resources)
    data_claim: str | None = None


PROFILES: dict[str, Profile] = {
    "cpu-small": Profile(
        description="the quickstart on any cluster: no GPUs, embedded data, one worker per task",
        config="quickstart",
        overrides=CLUSTER_OVERRIDES + ("device=cpu", "budget.gpu_hours=1.0",
                                       "milestones.every_gpu_hours=0.25"),
        worker=Resources(cpu="2", memory="4Gi"),
        coordinator=Resources(cpu="1", memory="2Gi")),
    "gpu-paper": Profile(
        # paper.md section 5: 16.8K GPU-hours for the lasso table, a tick every 2.4K
        description="the paper's config: four GPU workers per task, data on a read-only volume",
        config="paper",
        overrides=CLUSTER_OVERRIDES + tuple(
            f"tasks.{t}.workers=4" for t in read_yaml("paper")["tasks"]) + (
            "data.images=/data/imagenet/train", "data.frames=/data/frames",
            "budget.gpu_hours=16800", "milestones.every_gpu_hours=2400"),
        worker=Resources(cpu="8", memory="48Gi", gpus=1),
        coordinator=Resources(cpu="8", memory="32Gi"),
        data_claim="mtssl-data"),
}


def run_spec(profile: str, *, config: str | None = None, overrides: tuple[str, ...] = (),
             run: str | None = None, **spec_fields) -> RunSpec:
    """The profile's RunSpec; `config` replaces its config source, `overrides` come last."""
    if profile not in PROFILES:
        raise ConfigError("profile", f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    p = PROFILES[profile]
    cfg = load_config(config or p.config, list(p.overrides) + list(overrides))
    spec = RunSpec(run=run or cfg.name, config=cfg, worker=p.worker, coordinator=p.coordinator,
                   data_claim=p.data_claim)
    return replace(spec, **spec_fields) if spec_fields else spec
