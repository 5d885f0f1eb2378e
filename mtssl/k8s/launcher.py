"""`mtssl launch --k8s`: create a run's objects (from mtssl.k8s.builders, in the spec's layout:
Trainer v2 or Training Operator v1), follow it to the end, resume it instead of duplicating
it, cancel or clean it up.

The launcher polls (a few reads per tick) rather than holding watch streams: a tick every few
seconds costs the API server little and survives its restarts without resourceVersion
bookkeeping.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from typing import Callable, TextIO

from mtssl.k8s import PYTORCHJOB, TRAINJOB, builders
from mtssl.k8s.builders import CUSTOM, RunSpec
from mtssl.k8s.status import RunStatus, job_state, pytorchjob_run_status, trainjob_run_status, trainjob_state

# per layout: the object whose state is the run's, and the kinds --cancel deletes
PRIMARY = {TRAINJOB: "TrainJob", PYTORCHJOB: "Job"}
WORKLOAD = {TRAINJOB: ("TrainJob", "TrainingRuntime"), PYTORCHJOB: ("PyTorchJob", "Job")}
MISSING_CRD_HINT = {
    "TrainJob": "is Kubeflow Trainer v2 installed (TrainJob CRD)? On Training Operator v1 "
                "use --api pytorchjob",
    "TrainingRuntime": "is Kubeflow Trainer v2 installed (TrainingRuntime CRD)?",
    "PyTorchJob": "is the Kubeflow Training Operator v1 (PyTorchJob CRD) installed? On "
                  "Kubeflow Trainer v2 use --api trainjob",
}


class LaunchError(RuntimeError):
    pass


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
        self.custom = client.CustomObjectsApi(api_client)
        # kind -> (create, read, replace, delete) of the built-in kinds
        self.builtin = {
            "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map,
                          core.replace_namespaced_config_map, core.delete_namespaced_config_map),
            "Service": (core.create_namespaced_service, core.read_namespaced_service, None,
                        core.delete_namespaced_service),
            "Job": (batch.create_namespaced_job, batch.read_namespaced_job, None,
                    batch.delete_namespaced_job),
        }
        self.list_pods = partial(core.list_namespaced_pod, self.ns)
        self.primary = (PRIMARY[spec.api], builders.trainjob_name(spec.run)
                        if spec.api == TRAINJOB else builders.coordinator_name(spec.run))

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
        elif err.status == 404:
            kind = what.split()[1]
            hint = f"; {MISSING_CRD_HINT[kind]}" if kind in MISSING_CRD_HINT else ""
        return f"{what} failed: {err.status} {err.reason}: {message}{hint}"

    def _fn(self, op: str, kind: str):
        """The client call for op on kind, taking (body=) for create, (name, ...) otherwise."""
        if kind in CUSTOM:
            group, version, plural = CUSTOM[kind]
            call = getattr(self.custom, f"{op}_namespaced_custom_object")  # create, get, delete
            return partial(call, group, version, self.ns, plural)
        create, read, replace, delete = self.builtin[kind]
        if op == "create":
            return partial(create, self.ns)
        fn = {"get": read, "replace": replace, "delete": delete}[op]
        return lambda name, **kw: fn(name, self.ns, **kw)

    def _op(self, op: str, obj_or_kind, name: str | None = None) -> dict | None:
        kind = obj_or_kind if isinstance(obj_or_kind, str) else obj_or_kind["kind"]
        name = name or obj_or_kind["metadata"]["name"]
        what = f"{op} {kind} {self.ns}/{name}"
        fn = self._fn(op, kind)
        if op == "create":
            return self._call(what, fn, body=obj_or_kind)
        if op == "replace":
            return self._call(what, fn, name, body=obj_or_kind)
        if op == "delete":
            return self._call(what, fn, name, propagation_policy="Background")
        return self._call(what, fn, name)

    def _run_state(self) -> str:
        kind, name = self.primary
        found = self._op("get", kind, name)
        return (trainjob_state if kind == "TrainJob" else job_state)(found)[0]

    # --- submit / resume --------------------------------------------------------------------
    def submit(self) -> str:
        """Create the run, or adopt it if it exists: returns 'created', 'resumed' or 'finished'."""
        objects = builders.run_objects(self.spec)
        config = objects[0]
        state = self._run_state()
        found = self._op("get", config)
        changed = found is not None and found.get("data") != config["data"]
        if state in ("pending", "suspended", "running") and changed:
            raise LaunchError(f"run '{self.spec.run}' is active in {self.ns} with a different "
                              f"config; cancel it first (--cancel) or pick another --run")
        if state == "succeeded" and not changed:
            self._say(f"run '{self.spec.run}' already finished; nothing to resume "
                      f"(--cleanup deletes it)")
            return "finished"
        if state in ("succeeded", "failed"):
            # New workload objects; the coordinator's --resume reloads the checkpoint.
            self._say(f"restarting run '{self.spec.run}' ({state}) from its latest checkpoint")
            self.cancel()
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
        try:
            self._fn("create", obj["kind"])(body=obj, _preload_content=False)
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
        kinds = WORKLOAD[self.spec.api]
        names = [(o["kind"], o["metadata"]["name"]) for o in builders.run_objects(self.spec)
                 if o["kind"] in kinds]
        deadline = time.monotonic() + timeout_s
        while any(self._op("get", kind, name) is not None for kind, name in names):
            if time.monotonic() > deadline:
                raise LaunchError(f"old objects of run '{self.spec.run}' still terminating "
                                  f"after {timeout_s:.0f} s")
            self.sleep(self.poll_s)

    # --- status / watch ---------------------------------------------------------------------
    def _pods(self) -> list[dict]:
        return self._call("list Pod", self.list_pods,
                          label_selector=builders.run_selector(self.spec.run))["items"]

    def status(self) -> RunStatus:
        kind, name = self.primary
        if kind == "TrainJob":
            trainjob = self._op("get", "TrainJob", name)
            jobset = self._op("get", "JobSet", name) if trainjob else None
            return trainjob_run_status(self.spec, trainjob, jobset, self._pods())
        job = self._op("get", "Job", name)
        group, version, plural = CUSTOM["PyTorchJob"]
        jobs = self._call("list PyTorchJob", self.custom.list_namespaced_custom_object, group,
                          version, self.ns, plural,
                          label_selector=builders.run_selector(self.spec.run))["items"]
        return pytorchjob_run_status(self.spec, job, jobs, self._pods())

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
            if st.absent:
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
        """Delete the run's objects of these kinds, last created first; checkpoints stay."""
        deleted = []
        for obj in reversed(builders.run_objects(self.spec)):
            if obj["kind"] in kinds and self._op("delete", obj) is not None:
                deleted.append(f"{obj['kind']} {obj['metadata']['name']}")
        return deleted

    def cancel(self) -> list[str]:
        """Stop the run (coordinator and workers); a later launch resumes it."""
        return self.delete(kinds=WORKLOAD[self.spec.api])

    def cleanup(self) -> list[str]:
        return self.delete(kinds=tuple({o["kind"] for o in builders.run_objects(self.spec)}))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
