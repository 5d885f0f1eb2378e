"""A real Prometheus on loopback scrapes a short `mtssl launch --local` run; its HTTP API's
GPU-hours per task match the coordinator's checkpointed totals, its recording rules evaluate,
and every metric name the dashboard and rules read is one the processes really export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "mtssl-rules.yaml"
SCRAPE_S = 1.0
RUN = "live"

pytestmark = pytest.mark.slow


def free_ports(n: int) -> int:
    """A base port with n consecutive free ports after it (the local launcher's base + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    pytest.skip("no run of free loopback ports")


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}), timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prometheus exited early"
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("prometheus did not become ready")


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """(Prometheus URL, run directory, storage) after the run finished and was scraped."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/install-services)")
    from conftest import TINY
    tmp = tmp_path_factory.mktemp("live")
    metrics_base = free_ports(5)  # coordinator + one worker per task
    prom_port, rendezvous = free_ports(1), free_ports(1)
    shutil.copy(RULES, tmp / RULES.name)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name],
        "scrape_configs": [{"job_name": "mtssl", "static_configs": [{"targets": [
            f"127.0.0.1:{p}" for p in range(metrics_base, metrics_base + 5)]}]}]}))
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{prom_port}"
    try:
        wait_ready(url, prom)
        overrides = TINY + [
            f"output.dir={tmp / 'run'}", f"output.storage={tmp / 'storage'}",
            "output.report=false", "schedule.max_steps=40", f"metrics.port={metrics_base}",
            "metrics.host=127.0.0.1", f"distributed.port={rendezvous}",
            "distributed.mode=async", "budget.gpu_hours=10"]
        env = dict(os.environ, MTSSL_RUN=RUN)
        launch = subprocess.run(
            [sys.executable, "-m", "mtssl.cli", "launch", "--local", "--config", "quickstart",
             *[a for o in overrides for a in ("--set", o)]],
            env=env, capture_output=True, text=True, timeout=170)
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
        time.sleep(2 * SCRAPE_S)  # rule evaluation after the last scrape
        yield url, tmp
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()


def coordinator_hours(storage: Path) -> dict[str, float]:
    from mtssl.checkpoint import CheckpointStore
    from mtssl.storage import open_storage
    state, _ = CheckpointStore(open_storage(str(storage))).load_latest()
    return {t: s / 3600 for t, s in state["device_seconds"].items()}


def test_prometheus_gpu_hours_per_task_match_the_coordinators_totals(scraped_run):
    url, tmp = scraped_run
    final = coordinator_hours(tmp / "storage")
    got = {r["metric"]["task"]: float(r["value"][1]) for r in query(
        url, f'last_over_time(mtssl_gpu_hours_total{{run="{RUN}"}}[10m])')}
    assert set(got) == set(final)
    for task, hours in final.items():
        assert hours > 0
        # the last scrape misses at most the final moments: under two scrape intervals of one
        # device (each task has one worker here; 'shared' is the coordinator's own time)
        assert hours - 2 * SCRAPE_S / 3600 < got[task] <= hours + 1e-12, task
    total = query(url, f'last_over_time(mtssl:gpu_hours:sum{{run="{RUN}"}}[10m])')
    # the rule's last evaluation may precede the last scrape by an interval (5 processes)
    assert float(total[0]["value"][1]) == pytest.approx(sum(got.values()),
                                                        abs=3 * SCRAPE_S * 5 / 3600)


def test_every_metric_the_dashboard_and_rules_read_was_scraped(scraped_run):
    from test_monitoring_rules import EXTERNAL_METRICS, dashboard, metric_names, queries
    from test_monitoring_rules import RULES as RULE_FILE
    url, _ = scraped_run
    with urllib.request.urlopen(f"{url}/api/v1/label/__name__/values", timeout=10) as r:
        scraped = set(json.loads(r.read())["data"])
    rules = yaml.safe_load(RULE_FILE.read_text())["groups"]
    recorded = {r["record"] for g in rules for r in g["rules"] if "record" in r}
    used = {n for _, e in queries(dashboard()) for n in metric_names(e)}
    used |= {n for g in rules for r in g["rules"] for n in metric_names(r["expr"])} - recorded
    missing = used - scraped - set(EXTERNAL_METRICS)
    assert not missing, f"read by the dashboard/rules but never exported: {sorted(missing)}"
    assert recorded <= scraped  # the recording rules produced series from the live data
