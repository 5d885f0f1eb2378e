"""`mtssl launch --k8s`: create a run's objects (from mtssl.k8s.builders), follow it to the end,
resume it instead of duplicating it, cancel or clean it up.

The launcher polls (one Job read, one PyTorchJob list and one Pod list per tick) rather than
holding three watch streams: a tick every few seconds costs the API server little and
survives its restarts without resourceVersion bookkeeping.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, TextIO

from mtssl.k8s import builders
from mtssl.k8s.builders import RunSpec

# Pod states no retry fixes: the user must change the image or create the Secret.
FATAL_WAITING = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError"}


class LaunchError(RuntimeError):
    pass


@dataclass
class RunStatus:
    coordinator: str = "absent"  # absent | pending | running | succeeded | failed
    tasks: dict[str, str] = field(default_factory=dict)  # task -> PyTorchJob state
    ready: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (active, wanted)
    restarts: int = 0
    problems: list[str] = field(default_factory=list)  # pod-level reasons worth showing
    failure: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.coordinator == "succeeded" and all(
            s == "succeeded" for s in self.tasks.values())

    def line(self, run: str) -> str:
        parts = [f"{run}: coordinator {self.coordinator}"]
        for task, state in self.tasks.items():
            active, wanted = self.ready.get(task, (0, 0))
            parts.append(f"{task} {active}/{wanted} {state}")
        parts.append(f"restarts {self.restarts}")
        return " | ".join(parts + self.problems)


def _condition(obj: dict, types: tuple[str, ...]) -> dict | None:
    """The latest True condition among `types`."""
    conds = [c for c in (obj.get("status") or {}).get("conditions") or []
             if c.get("type") in types and c.get("status") == "True"]
    return conds[-1] if conds else None


def job_state(job: dict | None) -> tuple[str, str | None]:
    """(state, failure reason) of the coordinator's batch/v1 Job."""
    if job is None:
        return "absent", None
    if _condition(job, ("Complete",)):
        return "succeeded", None
    failed = _condition(job, ("Failed",))
    if failed:
        return "failed", f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".strip()
    return ("running" if (job.get("status") or {}).get("active") else "pending"), None


def pytorchjob_state(job: dict) -> tuple[str, str | None]:
    cond = _condition(job, ("Created", "Running", "Restarting", "Succeeded", "Failed"))
    if cond is None:
        return "pending", None
    state = cond["type"].lower()
    reason = f"{cond.get('reason', '')}: {cond.get('message', '')}" if state == "failed" else None
    return ("pending" if state == "created" else state), reason


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


class Launcher:
    """Creates and follows one run; `api_client` is a kubernetes.client.ApiClient."""

    def __init__(self, spec: RunSpec, *, api_client, out: TextIO = sys.stderr,
                 poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        from kubernetes import client
        if not spec.namespace:
            raise LaunchError("a namespace is required")
        self.spec, self.ns, self.out, self.poll_s, self.sleep = (
            spec, spec.namespace, out, poll_s, sleep)
        core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        custom = client.CustomObjectsApi(api_client)
        pj = builders.PYTORCHJOB
        self.apis = {
            "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map,
                          core.replace_namespaced_config_map, core.delete_namespaced_config_map),
            "Service": (core.create_namespaced_service, core.read_namespaced_service, None,
                        core.delete_namespaced_service),
            "Job": (batch.create_namespaced_job, batch.read_namespaced_job, None,
                    batch.delete_namespaced_job),
            "PyTorchJob": (partial(custom.create_namespaced_custom_object, pj["group"],
                                   pj["version"]),
                           partial(custom.get_namespaced_custom_object, pj["group"],
                                   pj["version"]), None,
                           partial(custom.delete_namespaced_custom_object, pj["group"],
                                   pj["version"])),
        }
        self.list_pytorchjobs = partial(custom.list_namespaced_custom_object, pj["group"],
                                        pj["version"], self.ns, pj["plural"])
        self.list_pods = partial(core.list_namespaced_pod, self.ns)

    # --- API calls, as plain dicts ----------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs) -> dict | None:
        """JSON body of the call; None on 404; LaunchError with the server's reason otherwise."""
        from kubernetes.client.rest import ApiException
        try:
            resp = fn(*args, _preload_content=False, **kwargs)
        except ApiException as err:
            if err.status == 404 and what.startswith(("get", "delete")):
                return None
            raise LaunchError(self._explain(what, err)) from None
        return json.loads(resp.data or b"{}")

    def _explain(self, what: str, err) -> str:
        try:
            message = json.loads(err.body).get("message", err.reason)
        except (TypeError, ValueError):
            message = err.reason
        hint = ""
        if err.status == 403:
            hint = (f"; the launcher needs the Role '{builders.LAUNCHER_SA}' of manifests/base "
                    f"(kubectl apply -k manifests/base -n {self.ns}) bound to its identity")
        elif err.status == 404 and "PyTorchJob" in what:
            hint = "; is the Kubeflow training operator (PyTorchJob CRD) installed?"
        return f"{what} failed: {err.status} {err.reason}: {message}{hint}"

    def _op(self, op: str, obj_or_kind, name: str | None = None, **kwargs) -> dict | None:
        kind = obj_or_kind if isinstance(obj_or_kind, str) else obj_or_kind["kind"]
        name = name or obj_or_kind["metadata"]["name"]
        create, read, replace, delete = self.apis[kind]
        plural = (builders.PYTORCHJOB["plural"],) if kind == "PyTorchJob" else ()
        what = f"{op} {kind} {self.ns}/{name}"
        if op == "create":
            return self._call(what, create, self.ns, *plural, body=obj_or_kind)
        if op == "get":
            return self._call(what, read, *((self.ns, plural[0], name) if plural
                                            else (name, self.ns)))
        if op == "replace":
            return self._call(what, replace, name, self.ns, body=obj_or_kind)
        args = (self.ns, plural[0], name) if plural else (name, self.ns)
        return self._call(what, delete, *args, propagation_policy="Background", **kwargs)

    # --- submit / resume --------------------------------------------------------------------
    def submit(self) -> str:
        """Create the run, or adopt it if it exists: returns 'created', 'resumed' or 'finished'."""
        objects = builders.run_objects(self.spec)
        config, job = objects[0], self._op("get", "Job", builders.coordinator_name(self.spec.run))
        found = self._op("get", config)
        coord, _ = job_state(job)
        changed = found is not None and found.get("data") != config["data"]
        if coord in ("pending", "running") and changed:
            raise LaunchError(f"run '{self.spec.run}' is active in {self.ns} with a different "
                              f"config; cancel it first (--cancel) or pick another --run")
        if coord == "succeeded" and not changed:
            self._say(f"run '{self.spec.run}' already finished; nothing to resume "
                      f"(--cleanup deletes it)")
            return "finished"
        if coord in ("succeeded", "failed"):
            # A new coordinator and workers; the coordinator's --resume reloads the checkpoint.
            self._say(f"restarting run '{self.spec.run}' (coordinator {coord}) from its "
                      f"latest checkpoint")
            self.delete(kinds=("Job", "PyTorchJob"))
            self._wait_gone()
        created = []
        try:
            for obj in objects:
                if obj is config and found is not None:
                    if changed:
                        self._op("replace", obj)
                        self._say(f"ConfigMap {obj['metadata']['name']} updated")
                elif self._create_or_adopt(obj):
                    created.append(obj)
        except LaunchError:
            self._rollback(created)
            raise
        state = "created" if len(created) == len(objects) else "resumed"
        self._say(f"{state} run '{self.spec.run}' in namespace {self.ns}: "
                  + ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in objects))
        return state

    def _create_or_adopt(self, obj: dict) -> bool:
        from kubernetes.client.rest import ApiException
        create = self.apis[obj["kind"]][0]
        plural = (builders.PYTORCHJOB["plural"],) if obj["kind"] == "PyTorchJob" else ()
        try:
            create(self.ns, *plural, body=obj, _preload_content=False)
            return True
        except ApiException as err:
            if err.status != 409:
                raise LaunchError(self._explain(f"create {obj['kind']} {self.ns}/"
                                                f"{obj['metadata']['name']}", err)) from None
        found = self._op("get", obj) or {}
        if (found.get("metadata", {}).get("labels") or {}).get(builders.LABEL_RUN) \
                != self.spec.run:
            raise LaunchError(f"{obj['kind']} {self.ns}/{obj['metadata']['name']} exists but "
                              f"does not belong to run '{self.spec.run}'")
        self._say(f"{obj['kind']} {obj['metadata']['name']} already exists: adopting it")
        return False

    def _rollback(self, created: list[dict]) -> None:
        for obj in reversed(created):
            try:
                self._op("delete", obj)
                self._say(f"rolled back {obj['kind']} {obj['metadata']['name']}")
            except LaunchError as err:
                self._say(f"could not roll back: {err}")

    def _wait_gone(self, timeout_s: float = 120.0) -> None:
        names = [("Job", builders.coordinator_name(self.spec.run))] + [
            ("PyTorchJob", builders.job_name(self.spec.run, t)) for t, _ in self.spec.tasks]
        deadline = time.monotonic() + timeout_s
        while any(self._op("get", kind, name) is not None for kind, name in names):
            if time.monotonic() > deadline:
                raise LaunchError(f"old objects of run '{self.spec.run}' still terminating "
                                  f"after {timeout_s:.0f} s")
            self.sleep(self.poll_s)

    # --- status / watch ---------------------------------------------------------------------
    def status(self) -> RunStatus:
        st = RunStatus()
        job = self._op("get", "Job", builders.coordinator_name(self.spec.run))
        st.coordinator, coord_failure = job_state(job)
        jobs = self._call("list PyTorchJob", self.list_pytorchjobs,
                          label_selector=builders.run_selector(self.spec.run))["items"]
        by_task = {j["metadata"]["labels"].get(builders.LABEL_TASK): j for j in jobs}
        failures = [f"coordinator Job {coord_failure}"] if coord_failure else []
        for task, wanted in self.spec.tasks:
            j = by_task.get(task)
            state, reason = pytorchjob_state(j) if j else ("absent", None)
            worker = ((j or {}).get("status") or {}).get("replicaStatuses", {}).get("Worker", {})
            st.tasks[task], st.ready[task] = state, (worker.get("active", 0), wanted)
            if reason:
                failures.append(f"PyTorchJob {j['metadata']['name']} {reason}")
        pods = self._call("list Pod", self.list_pods,
                          label_selector=builders.run_selector(self.spec.run))["items"]
        st.restarts, st.problems, fatal = pod_problems(pods)
        if fatal:
            failures.append(fatal)
        if failures:
            st.failure = "; ".join(failures + st.problems)
        return st

    def watch(self, *, timeout_s: float | None = None) -> RunStatus:
        """Poll until the run succeeds (returned) or fails (LaunchError with the reason)."""
        start, last = time.monotonic(), None
        while True:
            st = self.status()
            line = st.line(self.spec.run)
            if line != last:
                elapsed = int(time.monotonic() - start)
                self._say(f"[{elapsed // 3600:02d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] "
                          f"{line}")
                last = line
            if st.failure:
                raise LaunchError(f"run '{self.spec.run}' failed: {st.failure}")
            if st.coordinator == "absent" and set(st.tasks.values()) == {"absent"}:
                raise LaunchError(f"no run '{self.spec.run}' in namespace {self.ns} (launch it "
                                  f"without --attach)")
            if st.succeeded:
                return st
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise LaunchError(f"run '{self.spec.run}' still going after {timeout_s:.0f} s "
                                  f"(it keeps running; watch again with --attach)")
            self.sleep(self.poll_s)

    # --- cancel / cleanup -------------------------------------------------------------------
    def delete(self, kinds: tuple[str, ...]) -> list[str]:
        """Delete the run's objects of these kinds; checkpoints stay in storage."""
        deleted = []
        for obj in reversed(builders.run_objects(self.spec)):
            if obj["kind"] in kinds and self._op("delete", obj) is not None:
                deleted.append(f"{obj['kind']} {obj['metadata']['name']}")
        return deleted

    def cancel(self) -> list[str]:
        """Stop the run (coordinator and workers); a later launch resumes it."""
        return self.delete(kinds=("PyTorchJob", "Job"))

    def cleanup(self) -> list[str]:
        return self.delete(kinds=("PyTorchJob", "Job", "Service", "ConfigMap"))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
