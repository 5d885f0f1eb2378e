"""The Training Operator v1 layout of a run, for clusters that still run it (Kubeflow <= 1.10
installs it; 1.11 installs Trainer v2 instead): the coordinator as a batch/v1 Job behind a
Service, and one PyTorchJob per task, on the same pod templates as the Trainer v2 layout.

- Coordinator = Job, not Deployment: a run ends, and a Deployment would restart a finished
  one. OnFailure restarts a crashed container in place; a lost pod is replaced by the Job
  controller; either way `--resume` reloads the latest checkpoint.
- Workers hold no state of their own (parameters come from the coordinator), so OnFailure
  restarts and replacement pods just rejoin; cleanPodPolicy Running removes leftovers at the
  end but keeps failed pods for their logs.
"""

from __future__ import annotations

from mtssl.k8s.builders import (
    CUSTOM,
    LABEL_ROLE,
    LABEL_RUN,
    METRICS_PORT,
    RunSpec,
    config_map,
    coordinator_name,
    job_name,
    labels,
    meta,
    pod_template,
)

WORKER_CONTAINER = "pytorch"  # the training operator injects its env into this container name
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
INDEX_FIELD = f"metadata.labels['{REPLICA_INDEX_LABEL}']"


def coordinator_service(spec: RunSpec) -> dict:
    lbls = labels(spec.run, "coordinator")
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(spec, coordinator_name(spec.run), lbls),
            "spec": {"selector": {LABEL_RUN: spec.run, LABEL_ROLE: "coordinator"},
                     # workers must reach a restarted coordinator before it reports ready
                     "publishNotReadyAddresses": True,
                     "ports": [{"name": "rendezvous", "port": spec.port,
                                "targetPort": "rendezvous"},
                               {"name": "metrics", "port": METRICS_PORT,
                                "targetPort": "metrics"}]}}


def coordinator_job(spec: RunSpec) -> dict:
    lbls = labels(spec.run, "coordinator")
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": meta(spec, coordinator_name(spec.run), lbls),
            "spec": {"backoffLimit": spec.coordinator_backoff_limit, "completions": 1,
                     "parallelism": 1,
                     "template": pod_template(spec, None, container="coordinator",
                                              restart_policy="OnFailure")}}


def pytorch_job(spec: RunSpec, task: str, workers: int) -> dict:
    group, version, _ = CUSTOM["PyTorchJob"]
    return {"apiVersion": f"{group}/{version}", "kind": "PyTorchJob",
            "metadata": meta(spec, job_name(spec.run, task), labels(spec.run, "worker", task)),
            "spec": {"runPolicy": {"backoffLimit": spec.worker_backoff_limit,
                                   "cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": {"Worker": {
                         "replicas": workers, "restartPolicy": "OnFailure",
                         # the replica spec sets the pods' restart policy
                         "template": pod_template(spec, task, container=WORKER_CONTAINER,
                                                  index_field=INDEX_FIELD)}}}}


def run_objects(spec: RunSpec) -> list[dict]:
    return ([config_map(spec), coordinator_service(spec), coordinator_job(spec)]
            + [pytorch_job(spec, t, n) for t, n in spec.tasks])
