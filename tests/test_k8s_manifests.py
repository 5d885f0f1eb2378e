"""manifests/: in sync with the builders and package configs, rendered by kustomize, and every
object valid against the Kubernetes, Kubeflow Trainer v2 / JobSet, PyTorchJob and
Prometheus-Operator schemas (../shared/schemas; those tests skip without it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mtssl.config import load_config, to_dict
from mtssl.k8s import CPU_IMAGE, GPU_IMAGE, PYTORCHJOB, TRAINJOB, base, builders, pytorchjob, trainjob
from mtssl.k8s.profiles import PROFILES, run_spec

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
K8S_VERSION = "1.32.0"  # the kubectl here; the objects use only APIs stable long before it
NS = "mtssl"
OVERLAYS = {(p, TRAINJOB): p for p in PROFILES} | {(p, PYTORCHJOB): f"{p}-pytorchjob"
                                                     for p in PROFILES}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "manifests" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kustomize(path: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (needed for `kubectl kustomize`)")
    out = subprocess.run(["nice", "-n", "19", "kubectl", "kustomize", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


@pytest.fixture(scope="module", params=sorted(OVERLAYS), ids="-".join)
def rendered(request) -> tuple[object, list[dict]]:
    """(the overlay's RunSpec, its rendered objects)."""
    profile, api = request.param
    objects = kustomize(ROOT / "manifests" / "overlays" / OVERLAYS[request.param])
    return run_spec(profile, namespace=NS, api=api), objects


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def schema_file(name: str) -> Path:
    path = SCHEMAS / name
    if not path.is_file():
        pytest.skip(f"schema {name} not found in {SCHEMAS} (see ../shared/schemas/README.md)")
    return path


def run_config(objects: list[dict]) -> dict:
    cm = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(cm["data"][builders.CONFIG_FILE])


def pod_templates(objects: list[dict]) -> dict[str | None, dict]:
    """task (None: the coordinator) -> pod template, in either layout."""
    out = {}
    for rt in by_kind(objects, "TrainingRuntime"):
        for rj in rt["spec"]["template"]["spec"]["replicatedJobs"]:
            pod = rj["template"]["spec"]["template"]
            out[pod["metadata"]["labels"].get(builders.LABEL_TASK)] = pod
    for job in by_kind(objects, "Job"):
        out[None] = job["spec"]["template"]
    for pj in by_kind(objects, "PyTorchJob"):
        out[pj["metadata"]["labels"][builders.LABEL_TASK]] = \
            pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    return out


# --- in sync --------------------------------------------------------------------------------

def test_committed_manifests_equal_what_the_generator_writes():
    gen = load_generator()
    assert gen.differences(ROOT / "manifests") == []
    assert gen.stale_files(ROOT / "manifests") == []


def test_generator_check_fails_on_a_stale_or_leftover_file(tmp_path):
    gen = load_generator()
    shutil.copytree(ROOT / "manifests", tmp_path / "m")
    target = tmp_path / "m" / "overlays" / "gpu-paper" / "config.yaml"
    target.write_text(target.read_text().replace("gpu_hours: 16800", "gpu_hours: 1"))
    (tmp_path / "m" / "overlays" / "gpu-paper" / "namespace.yaml").write_text("{}\n")
    assert gen.main(["--check", "--out", str(tmp_path / "m")]) == 1
    assert gen.differences(tmp_path / "m") == ["overlays/gpu-paper/config.yaml"]
    assert gen.stale_files(tmp_path / "m") == ["overlays/gpu-paper/namespace.yaml"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_overlay_config_is_the_package_config_with_the_profile_overrides(profile):
    p = PROFILES[profile]
    path = ROOT / "manifests" / "overlays" / profile / builders.CONFIG_FILE
    expected = to_dict(load_config(p.config, list(p.overrides)))
    assert yaml.safe_load(path.read_text()) == expected
    # and it loads as a config in its own right, as the pods will load it
    assert to_dict(load_config(path)) == expected


# --- kustomize renders exactly the launcher's objects ----------------------------------------

def test_overlay_renders_the_launchers_objects_plus_the_shared_base(rendered):
    spec, objects = rendered
    got = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    run = builders.run_objects(spec)
    for obj in run:
        assert got[(obj["kind"], obj["metadata"]["name"])] == obj
    shared = set(got) - {(o["kind"], o["metadata"]["name"]) for o in run}
    assert shared == {("ServiceAccount", builders.LAUNCHER_SA), ("Role", builders.LAUNCHER_SA),
                      ("RoleBinding", builders.LAUNCHER_SA), ("PodMonitor", "mtssl"),
                      ("PrometheusRule", "mtssl")}
    assert all(o["metadata"].get("namespace") == NS for o in objects)


def test_delete_k_leaves_the_users_namespace_and_secret_alone(rendered):
    _, objects = rendered
    assert by_kind(objects, "Namespace") == [] and by_kind(objects, "Secret") == []


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_trainjob_layout_one_runtime_one_trainjob_one_replicated_job_per_task(profile):
    spec = run_spec(profile, namespace=NS)
    objects = kustomize(ROOT / "manifests" / "overlays" / profile)
    cfg = run_config(objects)
    (rt,) = by_kind(objects, "TrainingRuntime")
    (tj,) = by_kind(objects, "TrainJob")
    assert tj["spec"]["runtimeRef"] == {"name": rt["metadata"]["name"],
                                        "apiGroup": "trainer.kubeflow.org",
                                        "kind": "TrainingRuntime"}
    js = rt["spec"]["template"]["spec"]
    enabled = [t for t, section in cfg["tasks"].items() if section["enabled"]]
    assert [rj["name"] for rj in js["replicatedJobs"]] == ["coordinator"] + [
        t.replace("_", "-") for t in enabled]
    for rj in js["replicatedJobs"]:
        job = rj["template"]["spec"]
        task = job["template"]["metadata"]["labels"].get(builders.LABEL_TASK)
        # Trainer v2.3 supports one Job per replicated job; the pool size is its parallelism
        assert rj["replicas"] == 1
        assert job["parallelism"] == job["completions"] == (
            cfg["tasks"][task]["workers"] if task else 1)
        assert job["completionMode"] == "Indexed"
        # any failure restarts the whole run (JobSet), never one pod on its own
        assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
        (rule,) = job["podFailurePolicy"]["rules"]
        assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
        assert rule["onExitCodes"]["containerName"] == \
            job["template"]["spec"]["containers"][0]["name"]
    policy = js["failurePolicy"]
    assert 1 <= policy["maxRestarts"] <= 10 and policy["restartStrategy"] == "Recreate"
    assert policy["rules"] == [{"name": trainjob.CONFIG_ERROR_RULE, "action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert js["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    # workers find the coordinator at JobSet's host name for job 0, pod 0 of 'coordinator'
    name = tj["metadata"]["name"]
    for pod in pod_templates(objects).values():
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MTSSL_COORDINATOR_ADDR"] == f"{name}-coordinator-0-0.{name}"
    assert spec.tasks == [(t, cfg["tasks"][t]["workers"]) for t in enabled]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pytorchjob_layout_one_pytorchjob_per_enabled_task(profile):
    objects = kustomize(ROOT / "manifests" / "overlays" / OVERLAYS[(profile, PYTORCHJOB)])
    cfg = run_config(objects)
    jobs = {j["metadata"]["labels"][builders.LABEL_TASK]: j for j in by_kind(objects, "PyTorchJob")}
    assert sorted(jobs) == sorted(t for t, s in cfg["tasks"].items() if s["enabled"])
    for task, job in jobs.items():
        worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
        assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
        assert worker["replicas"] == cfg["tasks"][task]["workers"]
        assert worker["restartPolicy"] == "OnFailure"
        assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
        assert worker["template"]["spec"]["containers"][0]["name"] == "pytorch"
    (job,) = by_kind(objects, "Job")
    (svc,) = by_kind(objects, "Service")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    ports = {p["name"]: p["containerPort"]
             for p in job["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert ports["rendezvous"] == cfg["distributed"]["port"]


def test_both_layouts_share_the_pod_templates():
    """The v1 overlay's pods are the Trainer v2 ones but for what each controller owns: the
    worker index field, the container name the operator wants, the restart policy, and the
    coordinator's address."""
    for profile in PROFILES:
        v2 = pod_templates(builders.run_objects(run_spec(profile, namespace=NS)))
        v1 = pod_templates(builders.run_objects(run_spec(profile, namespace=NS, api=PYTORCHJOB)))
        assert set(v1) == set(v2)
        for task in v2:
            a, b = copy.deepcopy(v2[task]), copy.deepcopy(v1[task])
            for pod in (a, b):
                pod["spec"].pop("restartPolicy", None)
                c = pod["spec"]["containers"][0]
                c.pop("name")
                c["env"] = [e for e in c["env"] if e["name"] not in (
                    "MTSSL_WORKER_INDEX", "MTSSL_COORDINATOR_ADDR")]
            assert a == b, (profile, task)


def test_each_role_gets_its_image_and_resources(rendered):
    spec, objects = rendered
    for task, pod in pod_templates(objects).items():
        (c,) = pod["spec"]["containers"]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if task is None:  # the coordinator keeps its state in host memory
            assert c["image"] == CPU_IMAGE and gpus is None
        else:
            gpu = spec.worker.gpus > 0
            assert c["image"] == (GPU_IMAGE if gpu else CPU_IMAGE)
            assert gpus == ("1" if gpu else None)
            assert bool(pod["spec"].get("tolerations")) == gpu


def test_pods_are_locked_down_and_reach_s3_only_through_references(rendered):
    _, objects = rendered
    for pod in pod_templates(objects).values():
        spec = pod["spec"]
        assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {"/tmp", builders.SCRATCH_DIR} <= writable
        env = {e["name"]: e for e in c["env"]}
        assert env["OMP_NUM_THREADS"]["valueFrom"] == {"resourceFieldRef": {
            "resource": "requests.cpu", "divisor": "1"}}
        for key, var in builders.S3_SECRET_KEYS.items():
            assert "value" not in env[var]
            assert env[var]["valueFrom"]["secretKeyRef"]["key"] == key


def test_gpu_paper_mounts_the_data_claim_read_only():
    objects = builders.run_objects(run_spec("gpu-paper", namespace=NS))
    for pod in pod_templates(objects).values():
        (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "data"]
        assert vol["persistentVolumeClaim"] == {"claimName": "mtssl-data", "readOnly": True}
        (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"]
                    if m["name"] == "data"]
        assert mount == {"name": "data", "mountPath": builders.DATA_DIR, "readOnly": True}


# --- kustomize options --------------------------------------------------------------------

def test_kueue_component_labels_the_trainjob_with_its_queue(tmp_path):
    rel = os.path.relpath(ROOT / "manifests", tmp_path)  # kustomize refuses absolute roots
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [f"{rel}/overlays/cpu-small"], "components": [f"{rel}/components/kueue"]}))
    objects = kustomize(tmp_path)
    (tj,) = by_kind(objects, "TrainJob")
    assert tj["metadata"]["labels"][trainjob.QUEUE_LABEL] == load_generator().QUEUE
    # the launcher's --queue gives the same object
    spec = run_spec("cpu-small", namespace=NS, queue=load_generator().QUEUE)
    assert tj == trainjob.train_job(spec)


def test_grafana_kustomization_puts_the_dashboard_where_the_sidecar_looks():
    (cm,) = kustomize(ROOT / "manifests" / "grafana")
    assert cm["metadata"]["namespace"] == base.GRAFANA_NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert text == (ROOT / "monitoring" / "grafana" / "mtssl-training.json").read_text()


def test_prometheus_objects_carry_the_selector_labels_and_the_rules(rendered):
    _, objects = rendered
    for kind in ("PodMonitor", "PrometheusRule"):
        (obj,) = by_kind(objects, kind)
        assert base.PROMETHEUS_SELECTOR.items() <= obj["metadata"]["labels"].items()
    (pm,) = by_kind(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {builders.LABEL_NAME: builders.APP}
    (rule,) = by_kind(objects, "PrometheusRule")
    rules = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "mtssl-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    for pod in pod_templates(objects).values():
        assert all(pod["metadata"]["labels"].get(k) == v
                   for k, v in pm["spec"]["selector"]["matchLabels"].items())
        assert port in [p["name"] for p in pod["spec"]["containers"][0]["ports"]]


# --- schemas --------------------------------------------------------------------------------

def test_builtin_kinds_validate_against_the_kubernetes_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    spec, objects = rendered
    builtin = [o for o in objects if o["apiVersion"].split("/")[0] in
               ("v1", "batch", "rbac.authorization.k8s.io")]
    # The runtime's Job templates are batch/v1 Jobs once JobSet creates them: validate as such.
    for rt in by_kind(objects, "TrainingRuntime"):
        builtin += [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rj["name"]},
                     **{"spec": rj["template"]["spec"]}}
                    for rj in rt["spec"]["template"]["spec"]["replicatedJobs"]]
    kinds = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"}
    v1_only = {"Service"} if spec.api == PYTORCHJOB else set()
    assert {o["kind"] for o in builtin} == kinds | v1_only
    for obj in builtin:
        kv.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misplaced_field():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    job = copy.deepcopy(pytorchjob.coordinator_job(run_spec("cpu-small", namespace=NS,
                                                             api=PYTORCHJOB)))
    job["spec"]["template"]["spec"]["args"] = ["coordinator"]  # belongs in the container
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSION, strict=True)


def pruned(obj, schema, path="") -> list[str]:
    """Fields the API server would silently drop: not in a structural schema's properties."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None:
            return [] if not isinstance(extra, dict) else [
                p for k, v in obj.items() for p in pruned(v, extra, f"{path}.{k}")]
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        out = [f"{path}.{k}" for k in obj if k not in props]
        return out + [p for k, v in obj.items() if k in props
                      for p in pruned(v, props[k], f"{path}.{k}")]
    if isinstance(obj, list) and "items" in schema:
        return [p for i, v in enumerate(obj) for p in pruned(v, schema["items"], f"{path}[{i}]")]
    return []


def crd_schema(file: str, version: str) -> dict:
    crd = yaml.safe_load(schema_file(file).read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


CRDS = {"TrainingRuntime": ("trainer.kubeflow.org_trainingruntimes.crd.yaml", "v1alpha1"),
        "TrainJob": ("trainer.kubeflow.org_trainjobs.crd.yaml", "v1alpha1"),
        "JobSet": ("jobset.x-k8s.io_jobsets.crd.yaml", "v1alpha2"),
        "PyTorchJob": ("kubeflow.org_pytorchjobs.crd.yaml", "v1")}


def as_jobset(runtime: dict) -> dict:
    """The JobSet Trainer makes of a runtime (same name, the template's spec)."""
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": runtime["metadata"]["name"]},
            "spec": runtime["spec"]["template"]["spec"]}


def test_custom_resources_validate_against_their_crds(rendered):
    import jsonschema
    spec, objects = rendered
    custom = [o for o in objects if o["kind"] in CRDS]
    custom += [as_jobset(rt) for rt in by_kind(objects, "TrainingRuntime")]
    assert {o["kind"] for o in custom} == (
        {"TrainingRuntime", "TrainJob", "JobSet"} if spec.api == TRAINJOB else {"PyTorchJob"})
    for obj in custom:
        schema = crd_schema(*CRDS[obj["kind"]])
        jsonschema.Draft4Validator(schema).validate(obj)
        assert pruned(obj, schema) == [], obj["kind"]


@pytest.mark.parametrize("kind,path,value,dropped", [
    ("TrainingRuntime", ("spec", "template", "spec", "failurePolicy", "maxRestarts"), "six",
     None),
    ("TrainingRuntime", ("spec", "template", "spec", "failurePolicy", "restartStrategy"),
     "Sometimes", None),
    ("TrainingRuntime", ("spec", "template", "spec", "failurePolicy", "maxRestart"), 6,
     ".spec.template.spec.failurePolicy.maxRestart"),
    ("TrainJob", ("spec", "runtimeRef", "names"), "x", ".spec.runtimeRef.names"),
    ("PyTorchJob", ("spec", "runPolicy", "backoffLimit"), "ten", None),
    ("PyTorchJob", ("spec", "pytorchReplicaSpecs", "Worker", "restartPolicies"), "OnFailure",
     ".spec.pytorchReplicaSpecs.Worker.restartPolicies"),
])
def test_crd_check_catches_a_wrong_type_or_a_field_the_server_would_drop(kind, path, value,
                                                                         dropped):
    import jsonschema
    api = PYTORCHJOB if kind == "PyTorchJob" else TRAINJOB
    obj = next(o for o in builders.run_objects(run_spec("cpu-small", namespace=NS, api=api))
               if o["kind"] == kind)
    bad = copy.deepcopy(obj)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    schema = crd_schema(*CRDS[kind])
    if dropped is None:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft4Validator(schema).validate(bad)
    else:
        assert pruned(bad, schema) == [dropped]


@pytest.mark.parametrize("kind,file", [
    ("PodMonitor", "monitoring.coreos.com_podmonitor_v1.json"),
    ("PrometheusRule", "monitoring.coreos.com_prometheusrule_v1.json")])
def test_monitoring_objects_validate_against_the_operator_schemas(rendered, kind, file):
    import jsonschema
    schema = json.loads(schema_file(file).read_text())
    _, objects = rendered
    (obj,) = by_kind(objects, kind)
    jsonschema.Draft7Validator(schema).validate(obj)
    bad = copy.deepcopy(obj)
    bad["spec"]["unknownField"] = 1
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad)), "schema is not strict"


def test_launcher_role_is_namespaced_bound_and_without_wildcards(rendered):
    _, objects = rendered
    (role,) = by_kind(objects, "Role")
    (binding,) = by_kind(objects, "RoleBinding")
    (sa,) = by_kind(objects, "ServiceAccount")
    assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NS}]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "secrets" not in rule["resources"]


# --- the pods run the same commands as the local launcher --------------------------------------

def test_pods_run_the_local_launchers_commands_and_variables(rendered):
    """`mtssl launch --local` on the overlay's config: same arguments, same MTSSL_* values,
    except the worker index (the controller's index field), the coordinator's address and the
    metrics port (one named port per pod instead of one per local process)."""
    from mtssl import env as envvars
    from mtssl.distributed.launch import roles
    spec, objects = rendered
    cfg = load_config(ROOT / "manifests" / "overlays" / spec_profile(spec) / builders.CONFIG_FILE)
    assert run_config(objects) == to_dict(cfg)
    addr = builders.coordinator_address(spec)
    plan = roles(cfg, config=builders.CONFIG_PATH, overrides=[], addr=addr,
                 port=cfg.distributed.port, run=cfg.name, metrics_base=0, resume=True)
    containers = {t: p["spec"]["containers"][0] for t, p in pod_templates(objects).items()}
    assert len(plan) == 1 + sum(n for _, n in spec.tasks)
    index = {TRAINJOB: trainjob.INDEX_FIELD, PYTORCHJOB: pytorchjob.INDEX_FIELD}[spec.api]
    for role in plan:
        task = role.env.get(envvars.TASK)
        container = containers[task]
        assert container["args"] == role.args
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        expected = {**role.env, envvars.METRICS_PORT: str(builders.METRICS_PORT)}
        if task:
            expected[envvars.INDEX] = {"fieldRef": {"fieldPath": index}}
        assert {k: env[k] for k in expected} == expected
        assert set(env) - set(expected) == set(builders.S3_SECRET_KEYS.values()) | {
            "OMP_NUM_THREADS"}
    assert containers[None]["args"][0] == "coordinator" and "--resume" in containers[None]["args"]
    assert all(c["args"][:3] == ["worker", "--task", t] for t, c in containers.items() if t)


def spec_profile(spec) -> str:
    return next(p for p in PROFILES if replace(run_spec(p, namespace=NS), api=spec.api) == spec)


def test_pod_arguments_parse_with_the_real_cli(rendered):
    from mtssl.cli import build_parser
    _, objects = rendered
    for pod in pod_templates(objects).values():
        args = build_parser().parse_args(pod["spec"]["containers"][0]["args"])
        assert args.config == builders.CONFIG_PATH and args.func.__name__ in (
            "cmd_coordinator", "cmd_worker")
