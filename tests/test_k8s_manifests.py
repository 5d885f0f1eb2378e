"""manifests/: in sync with the builders and package configs, rendered by kustomize, and every
object valid against the Kubernetes, PyTorchJob-CRD and Prometheus-Operator schemas."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mtssl.config import load_config, to_dict
from mtssl.k8s import builders
from mtssl.k8s.profiles import PROFILES, run_spec

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
K8S_VERSION = "1.32.0"  # the kubectl here; the objects use only APIs stable long before it
NS = "mtssl"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "manifests" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (needed for `kubectl kustomize`)")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "manifests" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


@pytest.fixture(scope="module", params=sorted(PROFILES))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def schema_file(name: str) -> Path:
    path = SCHEMAS / name
    if not path.is_file():
        pytest.skip(f"schema {name} not found in {SCHEMAS} (see ../shared/schemas/README.md)")
    return path


# --- in sync --------------------------------------------------------------------------------

def test_committed_manifests_equal_what_the_generator_writes():
    assert load_generator().differences(ROOT / "manifests") == []


def test_generator_check_fails_on_a_stale_file(tmp_path):
    gen = load_generator()
    shutil.copytree(ROOT / "manifests", tmp_path / "m")
    target = tmp_path / "m" / "overlays" / "gpu-paper" / "config.yaml"
    target.write_text(target.read_text().replace("gpu_hours: 16800", "gpu_hours: 1"))
    assert gen.main(["--check", "--out", str(tmp_path / "m")]) == 1
    assert gen.differences(tmp_path / "m") == ["overlays/gpu-paper/config.yaml"]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_overlay_config_is_the_package_config_with_the_profile_overrides(profile):
    p = PROFILES[profile]
    text = (ROOT / "manifests" / "overlays" / profile / builders.CONFIG_FILE).read_text()
    expected = to_dict(load_config(p.config, list(p.overrides)))
    assert yaml.safe_load(text) == expected
    # and it loads as a config in its own right, as the pods will load it
    path = ROOT / "manifests" / "overlays" / profile / builders.CONFIG_FILE
    assert to_dict(load_config(path)) == expected


# --- kustomize renders exactly the launcher's objects ----------------------------------------

def test_overlay_renders_the_launchers_objects_plus_the_shared_base(rendered):
    profile, objects = rendered
    spec = run_spec(profile, namespace=NS)
    got = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    run = builders.run_objects(spec)
    for obj in run:
        assert got[(obj["kind"], obj["metadata"]["name"])] == obj
    shared = {(o["kind"], o["metadata"]["name"]) for o in objects} - {
        (o["kind"], o["metadata"]["name"]) for o in run}
    assert shared == {("Namespace", NS), ("ServiceAccount", builders.LAUNCHER_SA),
                      ("Role", builders.LAUNCHER_SA), ("RoleBinding", builders.LAUNCHER_SA),
                      ("PodMonitor", "mtssl"), ("PrometheusRule", "mtssl"),
                      ("ConfigMap", "mtssl-grafana-dashboard")}
    assert all(o["metadata"].get("namespace") == NS for o in objects if o["kind"] != "Namespace")


def test_one_pytorchjob_per_enabled_task_with_its_configured_workers(rendered):
    profile, objects = rendered
    cm = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    cfg = yaml.safe_load(cm["data"][builders.CONFIG_FILE])
    jobs = {j["metadata"]["labels"][builders.LABEL_TASK]: j for j in by_kind(objects, "PyTorchJob")}
    enabled = [t for t, section in cfg["tasks"].items() if section["enabled"]]
    assert sorted(jobs) == sorted(enabled)
    for task, job in jobs.items():
        worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
        assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
        assert worker["replicas"] == cfg["tasks"][task]["workers"]
        # a lost worker is restarted or replaced; the run as a whole tolerates many of those
        assert worker["restartPolicy"] == "OnFailure"
        assert job["spec"]["runPolicy"]["backoffLimit"] >= 10
        assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
        container = worker["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator's default container name
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if profile == "gpu-paper" else None)
    if profile == "gpu-paper":
        assert all(n == 4 for n in [cfg["tasks"][t]["workers"] for t in enabled])


def test_coordinator_is_a_resuming_job_behind_a_service(rendered):
    _, objects = rendered
    (job,) = by_kind(objects, "Job")
    (svc,) = by_kind(objects, "Service")
    pod = job["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert pod["spec"]["containers"][0]["args"][-1] == "--resume"
    assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    cm = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    cfg = yaml.safe_load(cm["data"][builders.CONFIG_FILE])
    assert ports["rendezvous"] == cfg["distributed"]["port"]
    assert cfg["output"]["storage"].startswith("s3://")  # checkpoints outlive pods


def pods(objects: list[dict]) -> list[dict]:
    return ([j["spec"]["template"]["spec"] for j in by_kind(objects, "Job")]
            + [j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
               for j in by_kind(objects, "PyTorchJob")])


def test_pods_reach_the_coordinator_and_s3_only_through_references(rendered):
    _, objects = rendered
    assert by_kind(objects, "Secret") == []
    (svc,) = by_kind(objects, "Service")
    for pod in pods(objects):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["MTSSL_COORDINATOR_ADDR"]["value"] == svc["metadata"]["name"]
        for key, var in builders.S3_SECRET_KEYS.items():
            assert "value" not in env[var]
            assert env[var]["valueFrom"]["secretKeyRef"]["key"] == key


# --- schemas --------------------------------------------------------------------------------

def test_builtin_kinds_validate_against_the_kubernetes_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    _, objects = rendered
    builtin = [o for o in objects if o["apiVersion"].split("/")[0] in
               ("v1", "batch", "rbac.authorization.k8s.io")]
    assert {o["kind"] for o in builtin} == {"Namespace", "ServiceAccount", "Role", "RoleBinding",
                                            "ConfigMap", "Service", "Job"}
    for obj in builtin:
        kv.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misplaced_field():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    job = copy.deepcopy(builders.coordinator_job(run_spec("cpu-small", namespace=NS)))
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


def pytorchjob_schema() -> dict:
    crd = yaml.safe_load(schema_file("kubeflow.org_pytorchjobs.crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_pytorchjobs_validate_against_the_crd_schema(rendered):
    import jsonschema
    schema = pytorchjob_schema()
    _, objects = rendered
    for job in by_kind(objects, "PyTorchJob"):
        jsonschema.Draft4Validator(schema).validate(job)
        assert pruned(job, schema) == []


def test_crd_check_catches_a_field_the_server_would_drop():
    import jsonschema
    schema = pytorchjob_schema()
    job = builders.pytorch_job(run_spec("cpu-small", namespace=NS), "exemplar", 1)
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["backoffLimit"] = "ten"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicies"] = "OnFailure"
    assert pruned(bad, schema) == [".spec.pytorchReplicaSpecs.Worker.restartPolicies"]


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


def test_pod_monitor_scrapes_the_metrics_port_of_every_run_pod(rendered):
    _, objects = rendered
    (pm,) = by_kind(objects, "PodMonitor")
    selector = pm["spec"]["selector"]["matchLabels"]
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    for pod_template in ([j["spec"]["template"] for j in by_kind(objects, "Job")]
                         + [j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
                            for j in by_kind(objects, "PyTorchJob")]):
        assert all(pod_template["metadata"]["labels"].get(k) == v for k, v in selector.items())
        assert port in [p["name"] for p in pod_template["spec"]["containers"][0]["ports"]]


def test_shared_objects_carry_the_monitoring_files(rendered):
    _, objects = rendered
    (rule,) = by_kind(objects, "PrometheusRule")
    rules = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "mtssl-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]
    (dash,) = [o for o in by_kind(objects, "ConfigMap")
               if o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    (text,) = dash["data"].values()
    assert text == (ROOT / "monitoring" / "grafana" / "mtssl-training.json").read_text()


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
    except the worker index (the operator's replica-index label) and the metrics port (one
    named port per pod instead of one per local process)."""
    from mtssl.distributed import env as envvars
    from mtssl.distributed.launch import roles
    profile, objects = rendered
    cm = next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))
    cfg = load_config(ROOT / "manifests" / "overlays" / profile / builders.CONFIG_FILE)
    assert yaml.safe_load(cm["data"][builders.CONFIG_FILE]) == to_dict(cfg)
    (svc,) = by_kind(objects, "Service")
    plan = roles(cfg, config=builders.CONFIG_PATH, overrides=[], addr=svc["metadata"]["name"],
                 port=cfg.distributed.port, run=cfg.name, metrics_base=0, resume=True)
    containers = {None: by_kind(objects, "Job")[0]["spec"]["template"]["spec"]["containers"][0]}
    for pj in by_kind(objects, "PyTorchJob"):
        containers[pj["metadata"]["labels"][builders.LABEL_TASK]] = \
            pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    replicas = [j["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
                for j in by_kind(objects, "PyTorchJob")]
    assert len(plan) == 1 + sum(replicas)
    for role in plan:
        task = role.env.get(envvars.TASK)
        container = containers[task]
        assert container["args"] == role.args
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        expected = {**role.env, envvars.METRICS_PORT: str(builders.METRICS_PORT)}
        if task:
            expected[envvars.INDEX] = {"fieldRef": {
                "fieldPath": f"metadata.labels['{builders.REPLICA_INDEX_LABEL}']"}}
        assert {k: env[k] for k in expected} == expected
        assert set(env) - set(expected) == set(builders.S3_SECRET_KEYS.values())
    assert containers[None]["args"][0] == "coordinator" and "--resume" in containers[None]["args"]
    assert all(c["args"][:3] == ["worker", "--task", t] for t, c in containers.items() if t)


def test_pod_arguments_parse_with_the_real_cli(rendered):
    from mtssl.cli import build_parser
    _, objects = rendered
    for pod in pods(objects):
        args = build_parser().parse_args(pod["containers"][0]["args"])
        assert args.config == builders.CONFIG_PATH and args.func.__name__ in (
            "cmd_coordinator", "cmd_worker")
