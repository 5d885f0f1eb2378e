"""`mtssl launch --k8s` against a local HTTP server that replays Kubernetes API responses, for
both layouts: Kubeflow Trainer v2 (tests/fixtures/k8s/trainjob) and Training Operator v1
(tests/fixtures/k8s/pytorchjob).

No API server runs here. The responses are written by hand in the API server's JSON formats
(see each file's "about"), served in order per (method, path) by a loopback server; the real
`kubernetes` client talks to it over HTTP.
"""

from __future__ import annotations

import copy
import io
import json
import threading
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("kubernetes", reason="the k8s extra is not installed (pip install '.[k8s]')")

from mtssl.k8s import PYTORCHJOB, TRAINJOB, base, builders, trainjob  # noqa: E402
from mtssl.k8s.launcher import Launcher, LaunchError  # noqa: E402
from mtssl.k8s.profiles import run_spec  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
NS = "mtssl"


def _merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Replay:
    """Serves a fixture's exchanges: per (method, path) in order; a 'repeat' one stays."""

    def __init__(self, fixture: str, objects: list[dict]):
        data = json.loads((FIXTURES / f"{fixture}.json").read_text())
        assert data["about"].startswith("Written by hand")
        self.queues: dict[tuple[str, str], deque] = defaultdict(deque)
        for ex in data["exchanges"]:
            self.queues[(ex["method"], ex["path"])].append(ex)
        self.objects = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
        self.requests: list[dict] = []
        self.unexpected: list[str] = []

    def _fill(self, body, request_body):
        if body == "$request":
            return request_body
        if isinstance(body, dict):
            if "$object" in body:
                rest = {k: v for k, v in body.items() if k != "$object"}
                return _merge(self.objects[body["$object"]], self._fill(rest, request_body))
            return {k: self._fill(v, request_body) for k, v in body.items()}
        if isinstance(body, list):
            return [self._fill(v, request_body) for v in body]
        return body

    def respond(self, method: str, url: str, body: bytes) -> tuple[int, dict]:
        parts = urlsplit(url)
        request_body = json.loads(body) if body else None
        self.requests.append({"method": method, "path": parts.path,
                              "query": parse_qs(parts.query), "body": request_body})
        queue = self.queues.get((method, parts.path))
        if not queue:
            self.unexpected.append(f"{method} {parts.path}")
            return 500, {"kind": "Status", "status": "Failure", "code": 500,
                         "message": f"replay: no recorded response for {method} {parts.path}"}
        ex = queue[0] if (len(queue) == 1 and queue[0].get("repeat")) else queue.popleft()
        return ex["status"], self._fill(ex["body"], request_body)

    def remaining(self) -> list[str]:
        return [f"{m} {p}" for (m, p), q in self.queues.items() for ex in q
                if not ex.get("repeat")]


@pytest.fixture
def replay():
    servers = []

    def start(fixture: str, spec=None) -> tuple[Replay, str]:
        """fixture: '<layout>/<scenario>', e.g. 'trainjob/create_then_succeeded'."""
        spec = spec or make_spec(fixture.split("/")[0])
        state = Replay(fixture, builders.run_objects(spec))

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                code, payload = state.respond(self.command, self.path, self.rfile.read(length))
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return state, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def make_spec(api: str = TRAINJOB):
    return run_spec("cpu-small", namespace=NS, api=api)


def api_client(url: str):
    from kubernetes import client
    conf = client.Configuration()
    conf.host = url
    return client.ApiClient(conf)


def launcher(url: str, out=None, spec=None, api: str = TRAINJOB) -> Launcher:
    return Launcher(spec or make_spec(api), api_client=api_client(url),
                    out=out or io.StringIO(), poll_s=0, sleep=lambda s: None)


def posted(state: Replay, kind_path: str) -> list[dict]:
    return [r["body"] for r in state.requests if r["method"] == "POST"
            and r["path"].endswith(kind_path)]


# --- Kubeflow Trainer v2 layout (the default) ----------------------------------------------

T = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/mtssl"


def test_launcher_against_replayed_api_create_then_watch_to_succeeded(replay):
    state, url = replay("trainjob/create_then_succeeded")
    out = io.StringIO()
    la = launcher(url, out)
    assert la.submit() == "created"
    final = la.watch()
    assert final.succeeded and final.coordinator == "succeeded"
    assert state.unexpected == [] and state.remaining() == []
    # what went over the wire is exactly what the manifests are generated from
    sent = [r["body"] for r in state.requests if r["method"] == "POST"]
    assert sent == builders.run_objects(make_spec())
    assert [b["kind"] for b in sent] == ["ConfigMap", "TrainingRuntime", "TrainJob"]
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
    assert len(lines) == 4  # one per change: queued, running, a whole-run restart, done
    assert "coordinator suspended" in lines[0] and "run restarts 0/6" in lines[0]
    assert "coordinator running" in lines[1] and "colorization 1/1 running" in lines[1]
    assert "run restarts 1/6" in lines[2]
    assert "coordinator succeeded" in lines[3] and "exemplar 0/1 succeeded" in lines[3]
    pods = [r for r in state.requests if r["path"].endswith("/pods")]
    assert {q for r in pods for q in r["query"]["labelSelector"]} == {
        "app.kubernetes.io/name=mtssl,mtssl/run=quickstart"}


def test_launcher_against_replayed_api_already_exists_resumes_instead_of_duplicating(replay):
    state, url = replay("trainjob/already_exists_resumed")
    out = io.StringIO()
    la = launcher(url, out)
    assert la.submit() == "resumed"
    assert la.watch().succeeded
    assert {r["method"] for r in state.requests} == {"GET", "POST"}
    assert state.unexpected == [] and state.remaining() == []
    assert posted(state, "/configmaps") == []  # same config: not even posted
    assert out.getvalue().count("already exists: adopting it") == 2


@pytest.mark.parametrize("fixture,reason", [
    ("watch_to_failed", "ReachedMaxRestarts: jobset failed due to reaching max number of "
                        "restarts (first failed job: mtssl-quickstart-exemplar-0)"),
    ("config_error_fails_at_once", "FailJobSetFailurePolicyAction: applying FailJobSet failure "
                                   "policy action (first failed job: "
                                   "mtssl-quickstart-coordinator-0)")])
def test_launcher_against_replayed_api_watch_to_failed_surfaces_the_reason(replay, fixture,
                                                                           reason):
    state, url = replay(f"trainjob/{fixture}")
    la = launcher(url)
    la.submit()
    with pytest.raises(LaunchError) as err:
        la.watch()
    assert f"TrainJob mtssl-quickstart {reason}" in str(err.value)
    assert state.unexpected == [] and state.remaining() == []


def test_launcher_against_replayed_api_watch_to_failed_names_the_pod_reason(replay):
    state, url = replay("trainjob/watch_to_failed")
    la = launcher(url)
    la.submit()
    with pytest.raises(LaunchError, match=r"exemplar-0-0-q0abc OOMKilled"):
        la.watch()


def test_launcher_against_replayed_api_403_explains_and_rolls_back(replay):
    state, url = replay("trainjob/forbidden_403")
    with pytest.raises(LaunchError) as err:
        launcher(url).submit()
    msg = str(err.value)
    assert "403 Forbidden" in msg and 'cannot create resource "trainjobs"' in msg
    assert "manifests/base" in msg
    deleted = [r["path"].rsplit("/", 2)[-2:] for r in state.requests if r["method"] == "DELETE"]
    assert deleted == [["trainingruntimes", "mtssl-quickstart"],
                       ["configmaps", "mtssl-quickstart-config"]]
    assert state.unexpected == [] and state.remaining() == []


def test_launcher_against_replayed_api_restarts_finished_run_with_new_config(replay):
    state, url = replay("trainjob/restart_finished_with_new_config")
    assert launcher(url).submit() == "resumed"
    assert state.unexpected == [] and state.remaining() == []
    put = [r for r in state.requests if r["method"] == "PUT"]
    assert len(put) == 1 and put[0]["body"] == builders.config_map(make_spec())
    order = [(r["method"], r["path"]) for r in state.requests]
    # the old objects are deleted, and seen gone, before the new ones are posted
    gone = max(i for i, o in enumerate(order) if o == ("GET", f"{T}/trainjobs/mtssl-quickstart"))
    assert order.index(("DELETE", f"{T}/trainjobs/mtssl-quickstart")) < gone < order.index(
        ("POST", f"{T}/trainingruntimes"))
    assert posted(state, "/trainjobs") == [trainjob.train_job(make_spec())]


def test_launcher_against_replayed_api_refuses_active_run_with_other_config(replay):
    state, url = replay("trainjob/active_with_other_config")
    with pytest.raises(LaunchError, match="active in mtssl with a different config"):
        launcher(url).submit()
    assert [r["method"] for r in state.requests] == ["GET", "GET"]


def test_launcher_against_replayed_api_cancel_then_cleanup(replay):
    state, url = replay("trainjob/cancel_and_cleanup")
    la = launcher(url)
    assert la.cancel() == ["TrainJob mtssl-quickstart", "TrainingRuntime mtssl-quickstart"]
    assert la.cleanup() == ["ConfigMap mtssl-quickstart-config"]
    assert state.unexpected == [] and state.remaining() == []
    policies = {q for r in state.requests for q in r["query"]["propagationPolicy"]}
    assert policies == {"Background"}  # JobSet, Jobs and pods go with the TrainJob


def test_launcher_against_replayed_api_attach_to_a_missing_run_fails(replay):
    state, url = replay("trainjob/attach_to_missing_run")
    with pytest.raises(LaunchError, match="no run 'quickstart' in namespace mtssl"):
        launcher(url).watch()
    assert state.unexpected == [] and state.remaining() == []


# --- Training Operator v1 layout (--api pytorchjob) ---------------------------------------

def test_v1_launcher_against_replayed_api_create_then_watch_to_succeeded(replay):
    state, url = replay("pytorchjob/create_then_succeeded")
    out = io.StringIO()
    la = launcher(url, out, api=PYTORCHJOB)
    assert la.submit() == "created"
    final = la.watch()
    assert final.succeeded and final.coordinator == "succeeded"
    assert state.unexpected == [] and state.remaining() == []
    # what went over the wire is exactly what the manifests are generated from
    sent = [r["body"] for r in state.requests if r["method"] == "POST"]
    assert sent == builders.run_objects(make_spec(PYTORCHJOB))
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
    assert len(lines) == 3  # one per change: running, a restart, succeeded
    assert "coordinator running" in lines[0] and "colorization 1/1 running" in lines[0]
    assert "restarts 1" in lines[1]
    assert "coordinator succeeded" in lines[2] and "exemplar 0/1 succeeded" in lines[2]
    # the run's pods and jobs are found by the run's labels
    lists = [r for r in state.requests if r["path"].endswith(("/pods", "/pytorchjobs"))
             and r["method"] == "GET"]
    assert {q for r in lists for q in r["query"]["labelSelector"]} == {
        "app.kubernetes.io/name=mtssl,mtssl/run=quickstart"}


def test_v1_launcher_against_replayed_api_already_exists_resumes_instead_of_duplicating(replay):
    state, url = replay("pytorchjob/already_exists_resumed")
    out = io.StringIO()
    la = launcher(url, out, api=PYTORCHJOB)
    assert la.submit() == "resumed"
    assert la.watch().succeeded
    methods = {r["method"] for r in state.requests}
    assert "DELETE" not in methods and "PUT" not in methods
    assert state.unexpected == [] and state.remaining() == []
    # no second ConfigMap: it existed with the same config, so it was not even posted
    assert posted(state, "/configmaps") == []
    assert out.getvalue().count("already exists: adopting it") == 6
    assert "resumed run 'quickstart'" in out.getvalue()


def test_v1_launcher_against_replayed_api_watch_to_failed_surfaces_the_reason(replay):
    state, url = replay("pytorchjob/watch_to_failed")
    la = launcher(url, api=PYTORCHJOB)
    la.submit()
    with pytest.raises(LaunchError) as err:
        la.watch()
    msg = str(err.value)
    assert "PyTorchJob mtssl-quickstart-colorization PyTorchJobFailed" in msg
    assert "1 Worker replica(s) failed" in msg
    assert "mtssl-quickstart-colorization-worker-0 CrashLoopBackOff (last exit: OOMKilled, " \
           "code 137)" in msg
    assert state.unexpected == []


def test_v1_launcher_against_replayed_api_403_explains_and_rolls_back(replay):
    state, url = replay("pytorchjob/forbidden_403")
    out = io.StringIO()
    with pytest.raises(LaunchError) as err:
        launcher(url, out, api=PYTORCHJOB).submit()
    msg = str(err.value)
    assert "403 Forbidden" in msg and 'cannot create resource "pytorchjobs"' in msg
    assert "manifests/base" in msg  # says which Role the launcher needs
    deleted = [r["path"].rsplit("/", 2)[-2:] for r in state.requests if r["method"] == "DELETE"]
    assert deleted == [["jobs", "mtssl-quickstart-coordinator"],
                       ["services", "mtssl-quickstart-coordinator"],
                       ["configmaps", "mtssl-quickstart-config"]]
    assert state.unexpected == [] and state.remaining() == []


def test_v1_launcher_against_replayed_api_restarts_finished_run_with_new_config(replay):
    state, url = replay("pytorchjob/restart_finished_with_new_config")
    assert launcher(url, api=PYTORCHJOB).submit() == "resumed"
    assert state.unexpected == [] and state.remaining() == []
    put = [r for r in state.requests if r["method"] == "PUT"]
    assert len(put) == 1 and put[0]["body"] == builders.config_map(make_spec(PYTORCHJOB))
    # the old objects are gone before the new ones are posted
    order = [(r["method"], r["path"].split("/")[-1]) for r in state.requests]
    assert order.index(("DELETE", "mtssl-quickstart-coordinator")) < order.index(("POST", "jobs"))
    assert [b["metadata"]["name"] for b in posted(state, "/pytorchjobs")] == [
        builders.job_name("quickstart", t) for t, _ in make_spec(PYTORCHJOB).tasks]


def test_v1_launcher_against_replayed_api_refuses_active_run_with_other_config(replay):
    state, url = replay("pytorchjob/active_with_other_config")
    with pytest.raises(LaunchError, match="active in mtssl with a different config"):
        launcher(url, api=PYTORCHJOB).submit()
    assert [r["method"] for r in state.requests] == ["GET", "GET"]


def test_v1_launcher_against_replayed_api_cancel_then_cleanup(replay):
    state, url = replay("pytorchjob/cancel_and_cleanup")
    la = launcher(url, api=PYTORCHJOB)
    cancelled = la.cancel()
    assert cancelled == ["PyTorchJob mtssl-quickstart-motion-segmentation",
                         "PyTorchJob mtssl-quickstart-colorization",
                         "PyTorchJob mtssl-quickstart-relative-position",
                         "Job mtssl-quickstart-coordinator"]  # exemplar was already gone
    assert la.cleanup() == ["Service mtssl-quickstart-coordinator",
                            "ConfigMap mtssl-quickstart-config"]
    assert state.unexpected == [] and state.remaining() == []
    policies = {q for r in state.requests for q in r["query"]["propagationPolicy"]}
    assert policies == {"Background"}  # pods go with their jobs


def test_v1_launcher_against_replayed_api_attach_to_a_missing_run_fails(replay):
    state, url = replay("pytorchjob/attach_to_missing_run")
    with pytest.raises(LaunchError, match="no run 'quickstart' in namespace mtssl"):
        launcher(url, api=PYTORCHJOB).watch()
    assert state.unexpected == [] and state.remaining() == []


def use_kubeconfig(tmp_path, monkeypatch, url, *, namespace=None):
    """Point the kubernetes client at the replay server through a kubeconfig file."""
    context = {"cluster": "replay", "user": "u", **({"namespace": namespace} if namespace else {})}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "replay",
        "clusters": [{"name": "replay", "cluster": {"server": url}}],
        "contexts": [{"name": "replay", "context": context}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))


def test_launch_command_against_replayed_api_via_kubeconfig(replay, tmp_path, monkeypatch,
                                                            capsys):
    from mtssl.cli import main
    state, url = replay("trainjob/create_then_succeeded")
    use_kubeconfig(tmp_path, monkeypatch, url, namespace=NS)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["launch", "--k8s", "--poll-s", "0"]) == 0
    assert "run 'quickstart' succeeded" in capsys.readouterr().out
    assert state.unexpected == []


def test_launch_command_against_replayed_api_403_exits_1(replay, tmp_path, monkeypatch,
                                                        capsys):
    from mtssl.cli import main
    _, url = replay("pytorchjob/forbidden_403")
    use_kubeconfig(tmp_path, monkeypatch, url)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["launch", "--k8s", "--api", "pytorchjob", "--namespace", NS,
                 "--poll-s", "0"]) == 1
    assert "Forbidden" in capsys.readouterr().err


# --- least privilege: the Role grants exactly what the launcher calls ---------------------

VERB = {"POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}


def api_calls(requests: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of each request, as the API server's authorizer sees it."""
    calls = set()
    for r in requests:
        parts = r["path"].strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        resource, named = rest[2], len(rest) > 3  # namespaces/<ns>/<resource>[/<name>]
        verb = VERB.get(r["method"]) or ("get" if named else "list")
        calls.add((group, resource, verb))
    return calls


def test_role_grants_exactly_the_calls_the_launcher_makes(replay):
    def follow(la):
        la.submit()
        la.watch()
    actions = {"create_then_succeeded": follow, "already_exists_resumed": follow,
               "watch_to_failed": follow, "config_error_fails_at_once": follow,
               "forbidden_403": Launcher.submit,
               "restart_finished_with_new_config": Launcher.submit,
               "active_with_other_config": Launcher.submit,
               "cancel_and_cleanup": lambda la: (la.cancel(), la.cleanup()),
               "attach_to_missing_run": Launcher.watch}
    fixtures = {f"{p.parent.name}/{p.stem}" for p in FIXTURES.glob("*/*.json")}
    used = set()
    for fixture in sorted(fixtures):
        api, scenario = fixture.split("/")
        state, url = replay(fixture)
        try:
            actions[scenario](launcher(url, api=api))
        except LaunchError:
            pass
        assert state.unexpected == [], fixture
        used |= api_calls(state.requests)
    role = next(o for o in base.launcher_rbac() if o["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert used == granted
