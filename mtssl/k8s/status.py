"""A run's state as `mtssl launch --k8s` shows it, read from the API objects of either layout
(Trainer v2: TrainJob + JobSet; Training Operator v1: Job + PyTorchJobs) and the run's pods."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtssl.k8s.builders import LABEL_TASK, RunSpec

# Pod states no retry fixes: the user must change the image or create the Secret.
FATAL_WAITING = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError"}


@dataclass
class RunStatus:
    coordinator: str = "absent"  # absent | pending | suspended | running | succeeded | failed
    tasks: dict[str, str] = field(default_factory=dict)  # task -> state of its worker pool
    ready: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (active, wanted)
    restarts: int = 0  # container restarts over the run's current pods
    run_restarts: tuple[int, int] | None = None  # Trainer v2: (whole-run restarts, limit)
    problems: list[str] = field(default_factory=list)  # pod-level reasons worth showing
    failure: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.coordinator == "succeeded" and all(
            s == "succeeded" for s in self.tasks.values())

    @property
    def absent(self) -> bool:
        return self.coordinator == "absent" and set(self.tasks.values()) <= {"absent"}

    def line(self, run: str) -> str:
        parts = [f"{run}: coordinator {self.coordinator}"]
        for task, state in self.tasks.items():
            active, wanted = self.ready.get(task, (0, 0))
            parts.append(f"{task} {active}/{wanted} {state}")
        parts.append(f"restarts {self.restarts}")
        if self.run_restarts:
            parts.append("run restarts {}/{}".format(*self.run_restarts))
        return " | ".join(parts + self.problems)


def condition(obj: dict, types: tuple[str, ...]) -> dict | None:
    """The latest True condition among `types`."""
    conds = [c for c in (obj.get("status") or {}).get("conditions") or []
             if c.get("type") in types and c.get("status") == "True"]
    return conds[-1] if conds else None


def _reason(cond: dict) -> str:
    return f"{cond.get('reason', cond['type'])}: {cond.get('message', '')}".strip()


def _finished(job: dict) -> tuple[str, str | None] | None:
    """(state, failure reason) from a Job's or TrainJob's Complete/Failed condition; None while
    neither is set."""
    if condition(job, ("Complete",)):
        return "succeeded", None
    failed = condition(job, ("Failed",))
    return ("failed", _reason(failed)) if failed else None


def job_state(job: dict | None) -> tuple[str, str | None]:
    """(state, failure reason) of the v1 layout's coordinator batch/v1 Job."""
    if job is None:
        return "absent", None
    return _finished(job) or (
        ("running" if (job.get("status") or {}).get("active") else "pending"), None)


def pytorchjob_state(job: dict) -> tuple[str, str | None]:
    cond = condition(job, ("Created", "Running", "Restarting", "Succeeded", "Failed"))
    if cond is None:
        return "pending", None
    state = cond["type"].lower()
    reason = f"{cond.get('reason', '')}: {cond.get('message', '')}" if state == "failed" else None
    return ("pending" if state == "created" else state), reason


def trainjob_state(job: dict | None) -> tuple[str, str | None]:
    """(state, failure reason) of a TrainJob: its Complete, Failed and Suspended conditions
    (Kueue keeps a TrainJob suspended until it admits all of its pods)."""
    if job is None:
        return "absent", None
    finished = _finished(job)
    if finished:
        return finished
    if condition(job, ("Suspended",)):
        return "suspended", None
    active = any(j.get("active") for j in (job.get("status") or {}).get("jobsStatus") or [])
    return ("running" if active else "pending"), None


def pod_problems(pods: list[dict]) -> tuple[int, list[str], str | None]:
    """(restarts, notable reasons, fatal reason) over the run's pods."""
    restarts, notes, fatal = 0, [], None
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                notes.append(f"{name} {cond.get('reason')}: {cond.get('message', '')}")
        for cs in status.get("containerStatuses") or []:
            restarts += cs.get("restartCount", 0)
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in FATAL_WAITING:
                fatal = f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}"
            elif waiting.get("reason") == "CrashLoopBackOff":
                notes.append(f"{name} CrashLoopBackOff (last exit: {last.get('reason')}, "
                             f"code {last.get('exitCode')})")
            elif last.get("reason") == "OOMKilled":
                notes.append(f"{name} OOMKilled")
    return restarts, notes, fatal


def _finish(st: RunStatus, failures: list[str], pods: list[dict]) -> RunStatus:
    st.restarts, st.problems, fatal = pod_problems(pods)
    if fatal:
        failures.append(fatal)
    if failures:
        st.failure = "; ".join(failures + st.problems)
    return st


def pytorchjob_run_status(spec: RunSpec, job: dict | None, pytorchjobs: list[dict],
                          pods: list[dict]) -> RunStatus:
    st = RunStatus()
    st.coordinator, coord_failure = job_state(job)
    by_task = {j["metadata"]["labels"].get(LABEL_TASK): j for j in pytorchjobs}
    failures = [f"coordinator Job {coord_failure}"] if coord_failure else []
    for task, wanted in spec.tasks:
        j = by_task.get(task)
        state, reason = pytorchjob_state(j) if j else ("absent", None)
        worker = ((j or {}).get("status") or {}).get("replicaStatuses", {}).get("Worker", {})
        st.tasks[task], st.ready[task] = state, (worker.get("active", 0), wanted)
        if reason:
            failures.append(f"PyTorchJob {j['metadata']['name']} {reason}")
    return _finish(st, failures, pods)


def _pool_state(entry: dict | None) -> str:
    """A replicated job's state from the TrainJob's jobsStatus entry (one Job per pool)."""
    if not entry:
        return "pending"
    for key, state in (("failed", "failed"), ("succeeded", "succeeded"),
                       ("suspended", "suspended"), ("active", "running")):
        if entry.get(key):
            return state
    return "pending"


def trainjob_run_status(spec: RunSpec, trainjob: dict | None, jobset: dict | None,
                        pods: list[dict]) -> RunStatus:
    from mtssl.k8s.trainjob import replicated_job_name
    st = RunStatus()
    state, failure = trainjob_state(trainjob)
    entries = {e.get("name"): e for e in ((trainjob or {}).get("status") or {}).get(
        "jobsStatus") or []}
    running = {}
    for pod in pods:
        task = pod["metadata"].get("labels", {}).get(LABEL_TASK)
        if task and (pod.get("status") or {}).get("phase") == "Running":
            running[task] = running.get(task, 0) + 1

    def pool(task):
        if state in ("absent", "succeeded", "failed", "suspended"):
            return state
        return _pool_state(entries.get(replicated_job_name(task)))
    st.coordinator = pool(None)
    for task, wanted in spec.tasks:
        st.tasks[task], st.ready[task] = pool(task), (running.get(task, 0), wanted)
    if jobset is not None:
        st.run_restarts = ((jobset.get("status") or {}).get("restarts", 0), spec.max_restarts)
    failures = [f"TrainJob {trainjob['metadata']['name']} {failure}"] if failure else []
    return _finish(st, failures, pods)
