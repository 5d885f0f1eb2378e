"""Prometheus alert rules (promtool check + unit tests) and the Grafana dashboard (valid JSON,
queries that parse, only metric names the code exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "monitoring" / "prometheus"
RULES = PROM / "mtssl-rules.yaml"
RULE_TESTS = PROM / "mtssl-rules.test.yaml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "mtssl-training.json"
# Metrics the dashboard may read that other exporters provide, with their source.
EXTERNAL_METRICS = {"kube_pod_container_status_restarts_total": "kube-state-metrics",
                    "kube_pod_status_phase": "kube-state-metrics",
                    "kube_job_failed": "kube-state-metrics"}
# Grafana substitutes these before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$run": "quickstart",
                     "$task": "exemplar"}


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/install-services)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


# --- alert rules ----------------------------------------------------------------------------

def test_promtool_check_rules():
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", RULE_TESTS.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def rule_tests() -> dict:
    return yaml.safe_load(RULE_TESTS.read_text())


def test_every_alert_has_unit_tests_that_fire_it_and_that_keep_it_quiet():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    assert alerts == {"MtsslGpuBudget80Percent", "MtsslGpuBudgetReached",
                      "MtsslTrainingPastBudget", "MtsslTrainingStalled", "MtsslRunNotTraining",
                      "MtsslJobFailed", "MtsslTaskAtChance", "MtsslTaskCollapsed"}
    cases = [c for t in rule_tests()["tests"] for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), alert
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), alert


def test_budget_reached_is_informational_and_only_training_past_it_is_critical():
    rules = {r.get("alert"): r for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}
    assert rules["MtsslGpuBudgetReached"]["labels"]["severity"] == "info"
    assert rules["MtsslTrainingPastBudget"]["labels"]["severity"] == "critical"
    assert "mtssl_steps_total" in rules["MtsslTrainingPastBudget"]["expr"]
    # the series-absent alert works from kube-state-metrics, not from mtssl's own series
    assert "kube_pod_status_phase" in rules["MtsslRunNotTraining"]["expr"]


@pytest.mark.parametrize("old,new", [
    ("mtssl:gpu_budget_used:ratio >= 0.8", "mtssl:gpu_budget_used:ratio >= 0.7"),
    ("expr: mtssl:gpu_budget_used:ratio >= 1\n", "expr: mtssl:gpu_budget_used:ratio > 1\n"),
    ("severity: info", "severity: critical"),
    # past-budget without the "still stepping" clause fires for a slow final checkpoint
    ("            and on (namespace, run)\n          sum by (namespace, run) "
     "(rate(mtssl_steps_total{role!=\"worker\"}[5m])) > 0\n", ""),
    ("> 0\n        for: 10m", "> 0\n        for: 1m"),
    ("> 900", "> 1800"),
    ("for: 5m\n        labels:\n          severity: warning",
     "for: 1m\n        labels:\n          severity: warning"),
    ("unless on (namespace, run) (mtssl:gpu_budget_used:ratio >= 1)", ""),
    ("            unless on (namespace, pod)\n          min by (namespace, pod) "
     "(time() - mtssl_last_step_timestamp_seconds) < 900\n", ""),
    ('phase=~"Pending|Running"', 'phase="Running"'),
    ("< 900\n        for: 15m", "< 900\n        for: 5m"),
    (', condition="true"', ""),
    ("for: 5m\n        labels:\n          severity: critical",
     "for: 1m\n        labels:\n          severity: critical"),
    # learning health: a healthy task fires
    ('(mtssl_task_unhealthy{status="at_chance"}) == 1',
     '(mtssl_task_unhealthy{status="at_chance"}) >= 0'),
    # without max by, the restarted coordinator pod's series pends anew, with a pod label
    ('max by (namespace, run, task, status) (mtssl_task_unhealthy{status="at_chance"}) == 1',
     'mtssl_task_unhealthy{status="at_chance"} == 1'),
    # flags that clear within 15 (at chance) or 10 minutes (collapse) fire
    ('status="at_chance"}) == 1\n        for: 15m', 'status="at_chance"}) == 1\n        for: 5m'),
    ('rank_collapse"}) == 1\n        for: 10m', 'rank_collapse"}) == 1\n        for: 1m'),
    # a rank collapse is a collapse too
    ('status=~"collapsed|rank_collapse"', 'status="collapsed"'),
    ('rank_collapse"}) == 1\n        for: 10m\n        labels:\n          severity: critical',
     'rank_collapse"}) == 1\n        for: 10m\n        labels:\n          severity: warning'),
])
def test_unit_tests_fail_when_a_rule_is_broken(tmp_path, old, new):
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert out.returncode != 0, f"unit tests still pass with {old!r} -> {new!r}"


# --- dashboard ------------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dash: dict) -> list[dict]:
    """The panels that query Prometheus: all but the rows, which only group them."""
    return [p for p in dash["panels"] if p["type"] != "row"]


def queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) of every panel target and query variable."""
    out = []
    for panel in query_panels(dash):
        out += [(panel["title"], t["expr"]) for t in panel["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_is_well_formed():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "run", "task"} <= variables
    cells = set()
    for p in dash["panels"]:
        assert p["type"] in {"row", "timeseries", "gauge", "stat", "table", "bargauge"}
        # an expanded row keeps no panels of its own: those below it are in dash["panels"]
        assert p["type"] != "row" or (p["collapsed"] is False and p["panels"] == [])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in query_panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))


def test_dashboard_shows_what_the_issue_asks_for():
    text = {p["title"]: " ".join(t["expr"] for t in p["targets"])
            for p in query_panels(dashboard())}
    wanted = {"GPU-hours per task vs budget": ("mtssl_gpu_hours_total", "mtssl_budget_gpu_hours"),
              "Loss per task": ("mtssl_task_loss",),
              "Throughput (samples/s per task)": ("mtssl_samples_total",),
              "Staleness (async, steps behind)": ("mtssl_staleness_steps",),
              "Pod restarts": ("kube_pod_container_status_restarts_total",),
              "Held-out pretext metric vs chance: $task": ("mtssl_pretext_heldout",
                                                           "mtssl_pretext_chance"),
              "Effective rank of the pooled features per task": (
                  "mtssl_feature_effective_rank",)}
    for title, names in wanted.items():
        assert all(n in text[title] for n in names), title


def test_learning_health_row_shows_each_task_against_its_chance_level():
    panels = dashboard()["panels"]
    (row,) = [p for p in panels if p["type"] == "row"]
    assert row["title"] == "Learning health"
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"]]
    assert {p["title"] for p in below} == {"Held-out pretext metric vs chance: $task",
                                           "Effective rank of the pooled features per task"}
    (heldout,) = [p for p in below if p.get("repeat")]
    assert heldout["repeat"] == "task"  # one panel per task
    chance = [t["refId"] for t in heldout["targets"] if "mtssl_pretext_chance" in t["expr"]]
    dashed = [o["matcher"]["options"] for o in heldout["fieldConfig"]["overrides"]
              if {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}
              in o["properties"] and o["matcher"]["id"] == "byFrameRefID"]
    assert chance and dashed == chance


def test_dashboard_counts_each_step_and_sample_once():
    """Workers count their share of the steps the coordinator counts for the whole run:
    adding both would double the rate, so step/sample panels read the coordinator (or the
    single-process trainer) only."""
    for panel in query_panels(dashboard()):
        for t in panel["targets"]:
            if re.search(r"mtssl_(samples_total|steps_total|step_duration_seconds)", t["expr"]):
                assert 'role!="worker"' in t["expr"], panel["title"]


def test_dashboard_takes_one_learning_health_value_per_task():
    """Only the trainer or coordinator exports the health gauges, without a role label; an old
    and a restarted coordinator pod may both be scraped for a while: take the max, never add."""
    health = [t["expr"] for p in query_panels(dashboard()) for t in p["targets"]
              if re.search(r"mtssl_(pretext_heldout|pretext_chance|feature_effective_rank)",
                           t["expr"])]
    assert len(health) == 3
    assert all(e.startswith("max by (") and "sum" not in e for e in health), health


def test_dashboard_separates_gpu_hours_from_cpu_hours():
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"])
             for p in query_panels(dashboard())}
    device = [(title, e) for title, e in exprs.items() if "mtssl_device_seconds_total" in e]
    assert sorted("gpu" if 'device_type="gpu"' in e else "cpu" if 'device_type="cpu"' in e
                  else "mixed" for _, e in device) == ["cpu", "gpu"]


def test_dashboard_queries_parse_with_promtool(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(queries(dashboard()))]}]}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", "q.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # and promtool does reject a broken query, so the check above means something
    rules["groups"][0]["rules"][0]["expr"] = "sum by (task (mtssl_task_loss)"
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", "q.yaml", cwd=tmp_path).returncode != 0


def metric_names(expr: str) -> set[str]:
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    names, stack = set(), [promql.parse(substitute(expr))]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "args", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if isinstance(child, list):
                stack += child
            elif child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)
    return names


def test_metric_name_extraction_finds_nested_selectors():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) '
                        '/ on(run) max(b{run="$run"}) + time() - c') == {"a_bucket", "b", "c"}


def exported_names() -> set[str]:
    """Sample names of every family mtssl.metrics registers (the exposition's names)."""
    from mtssl import metrics
    m = metrics.Metrics(run="r", role="coordinator", device_type="cpu")
    names = set()
    for family in m.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_and_rules_use_only_exported_metric_names():
    used = {n for _, expr in queries(dashboard()) for n in metric_names(expr)}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule_exprs = [r["expr"] for g in groups for r in g["rules"]]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    used |= {n for e in rule_exprs for n in metric_names(e)} - recorded
    unknown = used - exported_names() - set(EXTERNAL_METRICS)
    assert not unknown, f"not exported by mtssl.metrics: {sorted(unknown)}"
