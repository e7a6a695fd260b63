"""Shared test machinery: real endpoint and worker processes on loopback.

Every process a test starts runs in a process group of its own and is stopped at teardown
by that group, so nothing outlives the test and nothing we did not start is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests

from endpoint.secret import peer_key, scaler_key, worker_key

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SECRET = "test-secret-0123456789abcdef"  # the cluster secret, which the endpoints hold
WORKER_KEY = worker_key(SECRET)
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_KEY}"}
WORKER_ENV = {"DW_SECRET": WORKER_KEY}  # what a worker process is started with
PEER_AUTH = {"Authorization": f"Bearer {peer_key(SECRET)}"}
SCALER_AUTH = {"Authorization": f"Bearer {scaler_key(SECRET)}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series of a /metrics answer."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(key) == value for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def reference(data: bytes, iterations: int) -> str:
    """The work as specified, written independently of worker.hashing."""
    out = hashlib.sha512(data).digest()
    for _ in range(iterations - 1):
        out = hashlib.sha512(out).digest()
    return out.hex()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[str]:
    """Serve `server` (bound to loopback) from a thread for the block; yields its base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, content_type: str, body: bytes) -> None:
    """A whole answer from a test's own HTTP server."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def kill_group(pgid: int) -> None:
    """SIGKILL to a process group we started; gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class Service:
    """A process we started, leading its own process group."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "DW_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash or a dead machine would."""
        self.signal_group(signal.SIGKILL)
        self.wait_gone()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.signal_group(signal.SIGKILL)
        self.wait_gone()

    def wait_gone(self, timeout: float = 15.0) -> None:
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        wait_for(lambda: not group_members(self.pid), timeout, f"process group of {self.name} to exit")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Endpoint:
    def __init__(self, services: Services, node_id: str, directory: Path, port: int, peer_url: str = "",
                 extra_args: tuple[str, ...] = (), host: str = "127.0.0.1", ca_file: str = "") -> None:
        self.node_id = node_id
        self.port = port
        self.host = host  # listen address, e.g. a HostNetwork gateway that fake hosts reach
        # With TLS (extra_args name the certificate): https, and the tests' requests trust this CA alone.
        self.verify: str | bool = ca_file or True
        self.url = f"{'https' if ca_file else 'http'}://{host}:{port}"
        self.db = directory / f"{node_id}.sqlite3"
        args = [PYTHON, "-m", "endpoint", "--node-id", node_id, "--host", host, "--port", str(port),
                "--db", str(self.db), "--log-level", "WARNING", *extra_args]
        if peer_url:
            args += ["--peer", peer_url]
        self.service = services.start(f"endpoint-{node_id}", args)
        self.wait_ready()

    def wait_ready(self) -> None:
        def answers() -> bool:
            if not self.service.running():
                raise AssertionError(f"endpoint {self.node_id} exited:\n{self.service.log()}")
            try:
                return requests.get(f"{self.url}/stats", timeout=1, verify=self.verify).status_code == 200
            except requests.exceptions.SSLError:  # up, and speaks TLS: a certificate refused is the test's business
                return True
            except (requests.ConnectionError, requests.Timeout):  # the port is bound before the app is up
                return False

        wait_for(answers, 20, f"endpoint {self.node_id} to answer")

    def restart(self) -> None:
        self.service.start()
        self.wait_ready()

    def enqueue(self, payload: bytes, iterations: int) -> str:
        response = requests.put(f"{self.url}/enqueue", params={"iterations": iterations}, data=payload,
                                headers={"Content-Type": "application/octet-stream"}, timeout=30, verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def pull(self, top: int) -> list[dict[str, str]]:
        response = requests.post(f"{self.url}/pullCompleted", params={"top": top}, timeout=30, verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self, public: bool = False) -> dict[str, Any]:
        """/stats with the details the peer key opens, or as anybody sees it."""
        response = requests.get(f"{self.url}/stats", headers={} if public else PEER_AUTH, timeout=10,
                                verify=self.verify)
        assert response.status_code == 200, response.text
        return response.json()

    def work(self, work_id: str, public: bool = False) -> requests.Response:
        """GET /work/<id> with the details the peer key opens (the worker), or as anybody sees it."""
        return requests.get(f"{self.url}/work/{work_id}", headers={} if public else PEER_AUTH, timeout=10,
                            verify=self.verify)


class Services:
    """Starts processes for one test and stops all of them afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Service] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, args, self.directory / f"{name}-{len(self.started)}.log", env)
        self.started.append(service)
        return service

    def endpoint(self, node_id: str, port: int | None = None, peer_url: str = "",
                 extra_args: tuple[str, ...] = (), host: str = "127.0.0.1", ca_file: str = "") -> Endpoint:
        return Endpoint(self, node_id, self.directory, port or free_port(host), peer_url, extra_args, host, ca_file)

    def endpoint_pair(self, extra_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                      tls: dict[str, tuple[str, ...]] | None = None, ca_file: str = "") -> tuple[Endpoint, Endpoint]:
        """With `tls` (each node's TLS arguments) and `ca_file`, both serve HTTPS and reach each other so."""
        port_a, port_b = free_port(host), free_port(host)
        scheme = "https" if tls else "http"
        tls = tls or {}
        a = self.endpoint("a", port_a, f"{scheme}://{host}:{port_b}", (*extra_args, *tls.get("a", ())), host, ca_file)
        b = self.endpoint("b", port_b, f"{scheme}://{host}:{port_a}", (*extra_args, *tls.get("b", ())), host, ca_file)
        return a, b

    def worker(self, endpoints: list[Endpoint], *, worker_id: str = "", processes: int = 1,
               idle_timeout: float = 300, extra_args: tuple[str, ...] = ()) -> Service:
        args = [PYTHON, "-m", "worker", "--processes", str(processes), "--idle-timeout", str(idle_timeout),
                "--poll-interval", "0.1", *extra_args]
        if worker_id:
            args += ["--worker-id", worker_id]
        for endpoint in endpoints:
            args += ["--endpoint", endpoint.url]
        return self.start(f"worker-{worker_id or len(self.started)}", args, WORKER_ENV)

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def pair(services: Services) -> tuple[Endpoint, Endpoint]:
    return services.endpoint_pair()


def drain(endpoints: list[Endpoint], expected: int, timeout: float = 60.0, top: int = 100) -> list[dict[str, str]]:
    """Pull from the endpoints in turn until `expected` results have arrived."""
    collected: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    turn = 0
    while len(collected) < expected:
        assert time.monotonic() < deadline, f"only {len(collected)} of {expected} results after {timeout}s"
        batch = endpoints[turn % len(endpoints)].pull(top)
        collected += batch
        turn += 1
        if not batch:
            time.sleep(0.05)
    return collected
