"""S3 emulator for tests: moto's standalone server (``python -m moto.server``) in a subprocess.

This is an emulator, not AWS S3: it speaks the S3 HTTP API well enough for the real minio client.
It runs on a free loopback port; being a subprocess it can be SIGKILLed mid-save to emulate a
crash. moto keeps objects in memory, so for restart tests (``persist=True``) moto's request
recorder logs every request it receives and the restarted server replays that log, which rebuilds
the objects that existed at the kill.

``FaultyProxy`` is a loopback HTTP proxy in front of the emulator that answers the first N
requests with an error (503 by default), to exercise retries.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Fake credentials only the emulator sees; distinctive so a leak is easy to grep for.
ACCESS_KEY = "EMULATORACCESSKEY7F3A"
SECRET_KEY = "emulator-secret-KEY-must-not-leak-91c2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_deps() -> None:
    pytest.importorskip("minio", reason="minio client not installed (pip install minio)")
    pytest.importorskip("flask", reason="moto[server] not installed (flask missing)")
    pytest.importorskip("moto.server", reason="moto[server] not installed")


class S3Emulator:
    """A moto S3 server subprocess on 127.0.0.1; ``kill`` then ``start`` = crash + restart."""

    def __init__(self, workdir: Path, *, persist: bool = False):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.persist = persist
        self.recording = self.workdir / "moto_recording.jsonl"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"MTSSL_S3_ENDPOINT": self.endpoint, "MTSSL_S3_ACCESS_KEY": ACCESS_KEY,
                "MTSSL_S3_SECRET_KEY": SECRET_KEY, "MTSSL_S3_SECURE": "false",
                "MTSSL_S3_REGION": "us-east-1"}

    def start(self, timeout_s: float = 30.0) -> None:
        env = dict(os.environ)
        if self.persist:
            env.update(MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=str(self.recording))
        log = open(self.workdir / "moto_server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.workdir / "moto_server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"S3 emulator did not start on {self.endpoint}:\n{text}")
            time.sleep(0.1)
        if self.persist and self.recording.exists():
            self._post("/moto-api/recorder/replay-recording")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    def _post(self, path: str) -> None:
        req = urllib.request.Request(f"http://{self.endpoint}{path}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200, resp.status

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, in-flight requests die with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class FaultyProxy:
    """Loopback HTTP proxy: the first ``failures`` requests get ``status``, the rest go upstream.

    ``xml=True`` answers like S3 (an XML ``<Error>``), else like a load balancer (plain text).
    ``echo_auth=True`` puts the request's Authorization header in the error body, the way a
    careless server might, to check that clients redact it.
    """

    def __init__(self, upstream: str, *, failures: int, status: int = 503, xml: bool = True,
                 echo_auth: bool = False):
        self.upstream = upstream
        self.failures_left = failures
        self.status = status
        self.xml = xml
        self.echo_auth = echo_auth
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _error_body(self, headers) -> tuple[str, bytes]:
        detail = f" auth={headers.get('Authorization')}" if self.echo_auth else ""
        code = "SlowDown" if self.status == 503 else "AccessDenied"
        if self.xml:
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>injected by FaultyProxy{detail}</Message><RequestId>x</RequestId>"
                    "</Error>")
            return "application/xml", body.encode()
        return "text/plain", f"injected by FaultyProxy{detail}".encode()

    def _handler_class(self):
        proxy = self
        hop = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    fail = proxy.failures_left > 0
                    if fail:
                        proxy.failures_left -= 1
                if fail:
                    # Recorded before answering: a client that has its answer may look at once.
                    proxy.seen.append((self.command, self.path, proxy.status))
                    ctype, payload = proxy._error_body(self.headers)
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                host, port = proxy.upstream.split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                fwd = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                conn.request(self.command, self.path, body=body or None, headers=fwd)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in hop:
                        self.send_header(k, v)
                head = self.command == "HEAD"
                length = resp.getheader("Content-Length", "0") if head else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.seen.append((self.command, self.path, resp.status))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


@pytest.fixture(scope="module")
def s3_emulator(tmp_path_factory):
    """One moto S3 emulator per test module (tests isolate themselves with fresh buckets)."""
    _require_deps()
    emu = S3Emulator(tmp_path_factory.mktemp("s3emu"))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def persistent_s3_emulator(tmp_path):
    """A private emulator that may be killed; restarting it replays the recorded requests."""
    _require_deps()
    emu = S3Emulator(tmp_path, persist=True)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def s3_env(s3_emulator, monkeypatch) -> dict[str, str]:
    """MTSSL_S3_* variables pointing at the emulator, set for the test."""
    env = s3_emulator.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A bucket name not yet used on the emulator (not created)."""
    return f"mtssl-test-{uuid.uuid4().hex[:12]}"
