"""What every layout of a training run shares, as plain dicts: the run's spec, names, labels,
its config ConfigMap and the pod templates of the coordinator and the workers.

Two layouts build on these pod templates: Kubeflow Trainer v2 (`mtssl.k8s.trainjob`: a
TrainingRuntime and a TrainJob) and Training Operator v1 (`mtssl.k8s.pytorchjob`: a Job,
a Service and one PyTorchJob per task). `manifests/generate.py` and `mtssl launch --k8s`
both build from here, so what `kubectl apply -k` creates and what the launcher creates
cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from mtssl import env as envvars
from mtssl.config import Config, to_dict
from mtssl.distributed.launch import Role, roles
from mtssl.k8s import APIS, CPU_IMAGE, GPU_IMAGE, S3_SECRET, TRAINJOB
from mtssl.validation import ConfigError

APP = "mtssl"
UID = 10001  # the images' non-root user (images/Dockerfile); pods run as it
CONFIG_DIR = "/etc/mtssl"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
SCRATCH_DIR = "/scratch"  # emptyDir: logs and reports; checkpoints go to output.storage
TMP_DIR = "/tmp"  # emptyDir: the root filesystem is read-only (images set HOME and caches here)
DATA_DIR = "/data"  # read-only data volume (data_claim), e.g. data.images=/data/imagenet/train
METRICS_PORT = 9400
LAUNCHER_SA = "mtssl-launcher"
# kind -> (group, version, plural) of the custom resources the launcher reads or writes
CUSTOM = {"TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
          "TrainingRuntime": ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes"),
          "JobSet": ("jobset.x-k8s.io", "v1alpha2", "jobsets"),
          "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs")}
LABEL_NAME, LABEL_RUN, LABEL_ROLE, LABEL_TASK = (
    "app.kubernetes.io/name", "mtssl/run", "mtssl/role", "mtssl/task")
# Kubeflow profile namespaces inject Istio sidecars; a sidecar would hold a finished Job's pod
# open and sit between gloo peers, so training pods opt out.
POD_LABELS = {"sidecar.istio.io/inject": "false"}
# Secret key -> environment variable (owned by mtssl.env); optional keys may be absent.
S3_SECRET_KEYS = {key: envvars.S3_VARS[key] for key in envvars.S3_SECRET_KEYS}
S3_OPTIONAL = envvars.S3_OPTIONAL
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Pod host names and the v1 operator's worker Services ('mtssl-<run>-motion-segmentation-...')
# must fit 63 characters: with the longest task name that leaves 24 for the run.
MAX_RUN_CHARS = 24


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "4Gi"
    gpus: int = 0

    def to_k8s(self) -> dict:
        # No CPU limit: throttling a data loader slows the whole task; memory is capped.
        limits = {"memory": self.memory}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        return {"requests": {"cpu": self.cpu, "memory": self.memory}, "limits": limits}


@dataclass(frozen=True)
class RunSpec:
    """One run on a cluster: its config plus where and how its pods run."""
    run: str
    config: Config
    api: str = TRAINJOB
    cpu_image: str = CPU_IMAGE
    gpu_image: str = GPU_IMAGE
    namespace: str | None = None
    worker: Resources = field(default_factory=Resources)
    coordinator: Resources = field(default_factory=Resources)
    s3_secret: str = S3_SECRET
    data_claim: str | None = None
    queue: str | None = None  # Kueue LocalQueue that admits the TrainJob as one workload
    max_restarts: int = 6  # trainjob: whole-run restarts (each resumes the latest checkpoint)
    coordinator_backoff_limit: int = 6  # pytorchjob layout only
    worker_backoff_limit: int = 20  # pytorchjob layout only

    def __post_init__(self):
        if not _DNS_LABEL.match(self.run) or len(self.run) > MAX_RUN_CHARS:
            raise ConfigError("run", f"{self.run!r} must be lowercase letters, digits and '-', "
                                     f"start with a letter, at most {MAX_RUN_CHARS} characters")
        if self.api not in APIS:
            raise ConfigError("api", f"must be one of {APIS}, got {self.api!r}")
        if not self.config.storage_uri.startswith("s3://"):
            raise ConfigError("output.storage", "on Kubernetes checkpoints must outlive pods: "
                              "set output.storage=s3://bucket/prefix (credentials come from "
                              f"Secret {self.s3_secret!r}), got {self.config.storage_uri!r}")

    @property
    def tasks(self) -> list[tuple[str, int]]:
        """(task, workers) of the enabled tasks, in rank order."""
        return [(t, getattr(self.config.tasks, t).workers) for t in self.config.enabled_tasks()]

    @property
    def port(self) -> int:
        return self.config.distributed.port

    def image(self, resources: Resources) -> str:
        return self.gpu_image if resources.gpus else self.cpu_image


# --- names --------------------------------------------------------------------------------

def config_map_name(run: str) -> str:
    return f"mtssl-{run}-config"


def coordinator_name(run: str) -> str:
    return f"mtssl-{run}-coordinator"


def job_name(run: str, task: str) -> str:
    return f"mtssl-{run}-{task.replace('_', '-')}"


def trainjob_name(run: str) -> str:
    """The TrainJob, its TrainingRuntime and the JobSet Trainer makes of them."""
    return f"mtssl-{run}"


def coordinator_address(spec: RunSpec) -> str:
    """Where workers find the coordinator: JobSet's host name of the coordinator's pod (job 0,
    index 0, on the JobSet's headless Service), or the v1 layout's Service."""
    if spec.api == TRAINJOB:
        name = trainjob_name(spec.run)
        return f"{name}-coordinator-0-0.{name}"
    return coordinator_name(spec.run)


def labels(run: str, role: str, task: str | None = None) -> dict[str, str]:
    out = {LABEL_NAME: APP, LABEL_RUN: run, LABEL_ROLE: role}
    if task:
        out[LABEL_TASK] = task
    return out


def run_selector(run: str) -> str:
    return f"{LABEL_NAME}={APP},{LABEL_RUN}={run}"


def meta(spec: RunSpec, name: str, lbls: dict) -> dict:
    out = {"name": name, "labels": dict(lbls)}
    if spec.namespace:
        out["namespace"] = spec.namespace
    return out


# --- pods ---------------------------------------------------------------------------------

def pod_roles(spec: RunSpec) -> dict[str | None, Role]:
    """The local launcher's roles as the pods run them (same `mtssl` arguments and variables),
    by task (None: the coordinator). The coordinator always resumes: a replaced pod continues
    from the latest checkpoint, and a fresh run starts at step 0."""
    plan = roles(spec.config, config=CONFIG_PATH, overrides=[], addr=coordinator_address(spec),
                 port=spec.port, run=spec.run, metrics_base=0, resume=True)
    out: dict[str | None, Role] = {}
    for role in plan:
        out.setdefault(role.env.get(envvars.TASK), role)  # a task's workers differ by index only
    return out


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _env(spec: RunSpec, role: Role, index_field: str | None) -> list[dict]:
    env = []
    for name, value in role.env.items():
        if name == envvars.INDEX:  # one template for all replicas: the controller's index
            env.append({"name": name, "valueFrom": {"fieldRef": {"fieldPath": index_field}}})
        else:  # every pod serves metrics on the same port, named for the PodMonitor
            env.append({"name": name, "value": str(METRICS_PORT)
                        if name == envvars.METRICS_PORT else value})
    # One OpenMP thread per requested core (rounded up), not one per core of the node.
    env.append({"name": "OMP_NUM_THREADS", "valueFrom": {"resourceFieldRef": {
        "resource": "requests.cpu", "divisor": "1"}}})
    for key, var in S3_SECRET_KEYS.items():
        ref = {"name": spec.s3_secret, "key": key}
        if key in S3_OPTIONAL:
            ref["optional"] = True
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(spec: RunSpec, shm: bool) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "config", "configMap": {"name": config_map_name(spec.run)}},
               {"name": "scratch", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "scratch", "mountPath": SCRATCH_DIR},
              {"name": "tmp", "mountPath": TMP_DIR}]
    if shm:  # data-loader processes pass batches through /dev/shm (64 MiB by default)
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": spec.data_claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return volumes, mounts


def pod_template(spec: RunSpec, task: str | None, *, container: str,
                 index_field: str | None = None, restart_policy: str | None = None) -> dict:
    """The pod template of the coordinator (task None) or of one task's workers, as every
    layout uses it. `index_field`: the downward-API field holding a worker's index;
    `restart_policy`: None where the layout's controller sets it."""
    role = pod_roles(spec)[task]
    resources = spec.worker if task else spec.coordinator
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    if task is None:
        ports.insert(0, {"name": "rendezvous", "containerPort": spec.port})
    volumes, mounts = _volumes(spec, shm=bool(task) and spec.config.data.num_workers > 0)
    pod = {
        # training pods never call the API server: no token in them
        "automountServiceAccountToken": False,
        # the coordinator writes its final checkpoint on SIGTERM; workers just leave
        "terminationGracePeriodSeconds": 30 if task else 120,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": container, "image": spec.image(resources), "args": list(role.args),
            "env": _env(spec, role, index_field), "ports": ports,
            "resources": resources.to_k8s(), "volumeMounts": mounts,
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": volumes,
    }
    if restart_policy:
        pod["restartPolicy"] = restart_policy
    if resources.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    lbls = labels(spec.run, "worker" if task else "coordinator", task)
    return {"metadata": {"labels": {**lbls, **POD_LABELS}}, "spec": pod}


# --- run objects --------------------------------------------------------------------------

def config_map(spec: RunSpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(spec, config_map_name(spec.run), labels(spec.run, "config")),
            "data": {CONFIG_FILE: config_yaml(spec.config)}}


def run_objects(spec: RunSpec) -> list[dict]:
    """What `mtssl launch --k8s` creates for the spec's layout, in creation order."""
    from mtssl.k8s import pytorchjob, trainjob
    return (trainjob if spec.api == TRAINJOB else pytorchjob).run_objects(spec)
