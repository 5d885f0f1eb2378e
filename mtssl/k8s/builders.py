"""The Kubernetes objects of one training run, as plain dicts.

`manifests/generate.py` and `mtssl launch --k8s` both build from here, so what
`kubectl apply -k` creates and what the launcher creates cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from mtssl.config import Config, to_dict
from mtssl.distributed import env as envvars
from mtssl.distributed.launch import Role, roles
from mtssl.k8s import IMAGE
from mtssl.validation import ConfigError

APP = "mtssl"
UID = 10001  # the image's non-root user (Dockerfile); pods run as it
CONFIG_DIR = "/etc/mtssl"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
SCRATCH_DIR = "/scratch"  # emptyDir: logs and reports; checkpoints go to output.storage
DATA_DIR = "/data"  # read-only data volume (data_claim), e.g. data.images=/data/imagenet/train
METRICS_PORT = 9400
LAUNCHER_SA = "mtssl-launcher"
PYTORCHJOB = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs"}
WORKER_CONTAINER = "pytorch"  # the training operator injects its env into this container name
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
LABEL_NAME, LABEL_RUN, LABEL_ROLE, LABEL_TASK = (
    "app.kubernetes.io/name", "mtssl/run", "mtssl/role", "mtssl/task")
# Secret key -> environment variable read by mtssl.storage; optional keys may be absent.
S3_SECRET_KEYS = {"endpoint": "MTSSL_S3_ENDPOINT", "access-key": "MTSSL_S3_ACCESS_KEY",
                  "secret-key": "MTSSL_S3_SECRET_KEY", "secure": "MTSSL_S3_SECURE",
                  "region": "MTSSL_S3_REGION"}
S3_OPTIONAL = ("secure", "region")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The operator names worker Services '<job>-worker-<i>' (<= 63 chars): with the longest task
# name ('motion-segmentation') and up to 99 workers that leaves 24 characters for the run.
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
    image: str = IMAGE
    namespace: str | None = None
    worker: Resources = field(default_factory=Resources)
    coordinator: Resources = field(default_factory=Resources)
    s3_secret: str = "mtssl-s3"
    data_claim: str | None = None
    coordinator_backoff_limit: int = 6
    worker_backoff_limit: int = 20

    def __post_init__(self):
        if not _DNS_LABEL.match(self.run) or len(self.run) > MAX_RUN_CHARS:
            raise ConfigError("run", f"{self.run!r} must be lowercase letters, digits and '-', "
                                     f"start with a letter, at most {MAX_RUN_CHARS} characters")
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


# --- names and commands -------------------------------------------------------------------

def config_map_name(run: str) -> str:
    return f"mtssl-{run}-config"


def coordinator_name(run: str) -> str:
    return f"mtssl-{run}-coordinator"


def job_name(run: str, task: str) -> str:
    return f"mtssl-{run}-{task.replace('_', '-')}"


def pod_roles(spec: RunSpec) -> dict[str | None, Role]:
    """The local launcher's roles as the pods run them (same `mtssl` arguments and variables),
    by task (None: the coordinator). The coordinator always resumes: a replaced pod continues
    from the latest checkpoint, and a fresh run starts at step 0."""
    plan = roles(spec.config, config=CONFIG_PATH, overrides=[], addr=coordinator_name(spec.run),
                 port=spec.port, run=spec.run, metrics_base=0, resume=True)
    out: dict[str | None, Role] = {}
    for role in plan:
        out.setdefault(role.env.get(envvars.TASK), role)  # a task's workers differ by index only
    return out


def labels(run: str, role: str, task: str | None = None) -> dict[str, str]:
    out = {LABEL_NAME: APP, LABEL_RUN: run, LABEL_ROLE: role}
    if task:
        out[LABEL_TASK] = task
    return out


def run_selector(run: str) -> str:
    return f"{LABEL_NAME}={APP},{LABEL_RUN}={run}"


def _meta(spec: RunSpec, name: str, lbls: dict) -> dict:
    meta = {"name": name, "labels": dict(lbls)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


# --- pods ---------------------------------------------------------------------------------

def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _env(spec: RunSpec, role: Role) -> list[dict]:
    env = []
    for name, value in role.env.items():
        if name == envvars.INDEX:  # one template for all replicas: the operator's index label
            env.append({"name": name, "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.labels['{REPLICA_INDEX_LABEL}']"}}})
        else:  # every pod serves metrics on the same port, named for the PodMonitor
            env.append({"name": name, "value": str(METRICS_PORT)
                        if name == envvars.METRICS_PORT else value})
    for key, var in S3_SECRET_KEYS.items():
        ref = {"name": spec.s3_secret, "key": key}
        if key in S3_OPTIONAL:
            ref["optional"] = True
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(spec: RunSpec, shm: bool) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "config", "configMap": {"name": config_map_name(spec.run)}},
               {"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "scratch", "mountPath": SCRATCH_DIR}]
    if shm:  # data-loader processes pass batches through /dev/shm (64 MiB by default)
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {
            "claimName": spec.data_claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return volumes, mounts


def pod_spec(spec: RunSpec, *, container: str, role: Role, resources: Resources,
             ports: list[dict], restart_policy: str | None, grace_s: int) -> dict:
    worker = envvars.TASK in role.env
    volumes, mounts = _volumes(spec, shm=worker and spec.config.data.num_workers > 0)
    pod = {
        # training pods never call the API server: no token in them
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": container, "image": spec.image, "args": list(role.args),
            "env": _env(spec, role), "ports": ports,
            "resources": resources.to_k8s(), "volumeMounts": mounts,
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": volumes,
    }
    if restart_policy:  # PyTorchJob pods get theirs from the replica spec
        pod["restartPolicy"] = restart_policy
    if resources.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    return pod


# --- run objects --------------------------------------------------------------------------

def config_map(spec: RunSpec) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(spec, config_map_name(spec.run), labels(spec.run, "config")),
            "data": {CONFIG_FILE: config_yaml(spec.config)}}


def coordinator_service(spec: RunSpec) -> dict:
    lbls = labels(spec.run, "coordinator")
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(spec, coordinator_name(spec.run), lbls),
            "spec": {"selector": {LABEL_RUN: spec.run, LABEL_ROLE: "coordinator"},
                     # workers must reach a restarted coordinator before it reports ready
                     "publishNotReadyAddresses": True,
                     "ports": [{"name": "rendezvous", "port": spec.port,
                                "targetPort": "rendezvous"},
                               {"name": "metrics", "port": METRICS_PORT,
                                "targetPort": "metrics"}]}}


def coordinator_job(spec: RunSpec) -> dict:
    """A Job, not a Deployment: a run ends, and a Deployment would restart a finished one.
    OnFailure restarts a crashed container in place; a lost pod is replaced by the Job
    controller; either way `--resume` reloads the latest checkpoint."""
    lbls = labels(spec.run, "coordinator")
    ports = [{"name": "rendezvous", "containerPort": spec.port},
             {"name": "metrics", "containerPort": METRICS_PORT}]
    pod = pod_spec(spec, container="coordinator", role=pod_roles(spec)[None],
                   resources=spec.coordinator, ports=ports, restart_policy="OnFailure",
                   grace_s=120)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _meta(spec, coordinator_name(spec.run), lbls),
            "spec": {"backoffLimit": spec.coordinator_backoff_limit, "completions": 1,
                     "parallelism": 1,
                     "template": {"metadata": {"labels": lbls}, "spec": pod}}}


def pytorch_job(spec: RunSpec, task: str, workers: int) -> dict:
    """One task's worker pool. Workers hold no state of their own (parameters come from the
    coordinator), so OnFailure restarts and replacement pods just rejoin; cleanPodPolicy
    Running removes leftovers at the end but keeps failed pods for their logs."""
    lbls = labels(spec.run, "worker", task)
    pod = pod_spec(spec, container=WORKER_CONTAINER, role=pod_roles(spec)[task],
                   resources=spec.worker,
                   ports=[{"name": "metrics", "containerPort": METRICS_PORT}],
                   restart_policy=None, grace_s=30)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _meta(spec, job_name(spec.run, task), lbls),
            "spec": {"runPolicy": {"backoffLimit": spec.worker_backoff_limit,
                                   "cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": {"Worker": {
                         "replicas": workers, "restartPolicy": "OnFailure",
                         "template": {"metadata": {"labels": lbls}, "spec": pod}}}}}


def run_objects(spec: RunSpec) -> list[dict]:
    """What `mtssl launch --k8s` creates, in creation order."""
    return ([config_map(spec), coordinator_service(spec), coordinator_job(spec)]
            + [pytorch_job(spec, t, n) for t, n in spec.tasks])


# --- shared, run-independent objects (manifests/base) ---------------------------------------

# (apiGroup, resource) -> verbs: exactly the calls mtssl.k8s.launcher makes.
LAUNCHER_RULES = {
    ("", "configmaps"): ["get", "create", "update", "delete"],  # update: resume, new config
    ("", "services"): ["get", "create", "delete"],
    ("", "pods"): ["list"],
    ("batch", "jobs"): ["get", "create", "delete"],
    ("kubeflow.org", "pytorchjobs"): ["get", "list", "create", "delete"],
}


def launcher_rbac(namespace: str | None = None) -> list[dict]:
    def meta(name):
        m = {"name": name, "labels": {LABEL_NAME: APP}}
        if namespace:
            m["namespace"] = namespace
        return m
    subject = {"kind": "ServiceAccount", "name": LAUNCHER_SA}
    if namespace:
        subject["namespace"] = namespace
    rules = [{"apiGroups": [g], "resources": [r], "verbs": list(v)}
             for (g, r), v in LAUNCHER_RULES.items()]
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(LAUNCHER_SA)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": meta(LAUNCHER_SA), "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": meta(LAUNCHER_SA),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": LAUNCHER_SA},
             "subjects": [subject]}]


def pod_monitor() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "mtssl", "labels": {LABEL_NAME: APP}},
            "spec": {"selector": {"matchLabels": {LABEL_NAME: APP}},
                     "podMetricsEndpoints": [{"port": "metrics", "interval": "15s",
                                              "path": "/metrics"}]}}


def prometheus_rule(groups: list[dict]) -> dict:
    """`groups` as in a Prometheus rule file (monitoring/prometheus/mtssl-rules.yaml)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "mtssl", "labels": {LABEL_NAME: APP}},
            "spec": {"groups": groups}}


def dashboard_config_map(name: str, dashboard_json: str) -> dict:
    """Grafana's dashboard sidecar loads ConfigMaps labelled grafana_dashboard: "1"."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mtssl-grafana-dashboard",
                         "labels": {LABEL_NAME: APP, "grafana_dashboard": "1"}},
            "data": {name: dashboard_json}}
