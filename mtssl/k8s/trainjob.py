"""The Kubeflow Trainer v2 layout of a run (the default): a TrainingRuntime whose JobSet
template holds the coordinator and one replicated job per task, and the TrainJob that runs it.

One runtime per run, named like its TrainJob: a TrainJob's runtimePatches may change its pods'
env, volumes and labels but neither their image nor how many pods a replicated job has, and
both follow the run's config (workers per task, CPU or GPU image). The TrainJob is the one
object Kueue admits (all pods at once) and the one `--cancel` deletes (JobSet, Jobs and pods
follow through owner references).

Failures: every Job has backoffLimit 0, so any failed pod fails its Job and JobSet restarts the
whole run (all Jobs recreated), at most `max_restarts` times; the new coordinator resumes from
the latest checkpoint and the new workers rejoin it. A config error (the CLI exits 2) fails the
Job through its podFailurePolicy with reason PodFailurePolicy, which fails the run at once
instead of spending restarts on it.
"""

from __future__ import annotations

from mtssl.k8s.builders import CUSTOM, RunSpec, config_map, labels, meta, pod_template, trainjob_name

COORDINATOR = "coordinator"  # replicated job and container name of the coordinator
WORKER = "worker"  # container name of every task's workers
# Indexed Jobs annotate each pod with its completion index: a worker's index in its task.
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
CONFIG_ERROR_EXIT = 2  # mtssl's exit status for config and environment errors
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_ERROR_RULE = "ConfigErrorFailsTheRun"


def api_version(kind: str) -> str:
    group, version, _ = CUSTOM[kind]
    return f"{group}/{version}"


def replicated_job_name(task: str | None) -> str:
    return COORDINATOR if task is None else task.replace("_", "-")


def replicated_job(spec: RunSpec, task: str | None, count: int) -> dict:
    container = WORKER if task else COORDINATOR
    pod = pod_template(spec, task, container=container, index_field=INDEX_FIELD if task else None,
                       restart_policy="Never")  # podFailurePolicy requires Never
    return {"name": replicated_job_name(task), "replicas": 1, "template": {
        "metadata": {"labels": labels(spec.run, "worker" if task else COORDINATOR, task)},
        "spec": {"parallelism": count, "completions": count, "completionMode": "Indexed",
                 "backoffLimit": 0,
                 "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                     "containerName": container, "operator": "In",
                     "values": [CONFIG_ERROR_EXIT]}}]},
                 "template": pod}}}


def training_runtime(spec: RunSpec) -> dict:
    jobs = [replicated_job(spec, None, 1)] + [replicated_job(spec, t, n) for t, n in spec.tasks]
    return {"apiVersion": api_version("TrainingRuntime"), "kind": "TrainingRuntime",
            "metadata": meta(spec, trainjob_name(spec.run), labels(spec.run, "runtime")),
            "spec": {"template": {"spec": {
                # workers reach the coordinator by its pod's host name, before it is ready
                "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
                "failurePolicy": {"maxRestarts": spec.max_restarts, "restartStrategy": "Recreate",
                                  "rules": [{"name": CONFIG_ERROR_RULE, "action": "FailJobSet",
                                             "onJobFailureReasons": ["PodFailurePolicy"]}]},
                "replicatedJobs": jobs}}}}


def train_job(spec: RunSpec) -> dict:
    lbls = labels(spec.run, "trainjob")
    if spec.queue:
        lbls[QUEUE_LABEL] = spec.queue
    return {"apiVersion": api_version("TrainJob"), "kind": "TrainJob",
            "metadata": meta(spec, trainjob_name(spec.run), lbls),
            "spec": {"runtimeRef": {"name": trainjob_name(spec.run),
                                    "apiGroup": CUSTOM["TrainingRuntime"][0],
                                    "kind": "TrainingRuntime"}}}


def run_objects(spec: RunSpec) -> list[dict]:
    return [config_map(spec), training_runtime(spec), train_job(spec)]
