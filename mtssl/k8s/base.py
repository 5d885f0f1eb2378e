"""The run-independent objects: the launcher's RBAC (manifests/base), the Prometheus Operator
objects (manifests/base/monitoring) and the Grafana dashboard ConfigMap (manifests/grafana)."""

from __future__ import annotations

from mtssl.k8s.builders import APP, CUSTOM, LABEL_NAME, LAUNCHER_SA

# The labels kube-prometheus-stack's Prometheus selects PodMonitors and PrometheusRules by
# (its release name; `podMonitorSelectorNilUsesHelmValues` defaults to true). Set by the
# kustomization of manifests/base/monitoring, where a user names their own release.
PROMETHEUS_SELECTOR = {"release": "kube-prometheus-stack"}
# Grafana's dashboard sidecar (kube-prometheus-stack: `grafana.sidecar.dashboards`) loads
# ConfigMaps with this label from Grafana's own namespace unless told to search others.
GRAFANA_LABEL = {"grafana_dashboard": "1"}
GRAFANA_NAMESPACE = "monitoring"


def _custom(kind: str) -> tuple[str, str]:
    group, _, plural = CUSTOM[kind]
    return group, plural


# (apiGroup, resource) -> verbs: exactly the calls mtssl.k8s.launcher makes, both layouts.
LAUNCHER_RULES = {
    ("", "configmaps"): ["get", "create", "update", "delete"],  # update: resume, new config
    ("", "pods"): ["list"],
    _custom("TrainingRuntime"): ["get", "create", "delete"],
    _custom("TrainJob"): ["get", "create", "delete"],
    _custom("JobSet"): ["get"],  # whole-run restarts, shown while following
    # the Training Operator v1 layout (--api pytorchjob)
    ("", "services"): ["get", "create", "delete"],
    ("batch", "jobs"): ["get", "create", "delete"],
    _custom("PyTorchJob"): ["get", "list", "create", "delete"],
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
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mtssl-grafana-dashboard",
                         "labels": {LABEL_NAME: APP, **GRAFANA_LABEL}},
            "data": {name: dashboard_json}}
