"""The worker: exact results, all cores, both endpoints, and the idle exit action."""

from __future__ import annotations

import glob
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, WORKER_ENV, Endpoint, Services, drain, free_port, reference, wait_for
from worker.hashing import CHECK_EVERY, work


@pytest.mark.parametrize("iterations", [1, 2, 3, 8191, 8192, 8193, 20_000])
def test_work_matches_the_reference(iterations: int) -> None:
    for payload in (b"\x00", b"Hello", os.urandom(5000)):
        assert work(payload, iterations) == reference(payload, iterations)


def test_work_stops_when_cancelled() -> None:
    checks = []

    def cancelled() -> bool:
        checks.append(1)
        return len(checks) >= 2

    assert work(b"x", 10_000_000, cancelled) is None
    assert len(checks) == 2


def test_worker_runs_one_job_per_core_by_default(services: Services) -> None:
    endpoint = services.endpoint("a")
    worker = services.start("worker", [PYTHON, "-m", "worker", "--endpoint", endpoint.url, "--poll-interval", "0.1"],
                            WORKER_ENV)
    cores = os.cpu_count() or 1
    ids = [endpoint.enqueue(f"job {index}".encode(), 2_000_000) for index in range(cores)]
    wait_for(lambda: endpoint.stats()["running"] == cores, timeout=20, what=f"{cores} jobs running at once")
    assert {endpoint.work(work_id).json()["state"] for work_id in ids} == {"running"}
    worker.stop()


def test_worker_serves_both_endpoints_and_retries_one_that_was_down(services: Services) -> None:
    port_a = free_port()
    b = services.endpoint("b", peer_url=f"http://127.0.0.1:{port_a}")
    down_url = f"http://127.0.0.1:{port_a}"
    worker = services.start("worker", [PYTHON, "-m", "worker", "--endpoint", down_url, "--endpoint", b.url,
                                       "--processes", "1", "--poll-interval", "0.1"], WORKER_ENV)
    b_items = {b.enqueue(f"b{index}".encode(), 100): reference(f"b{index}".encode(), 100) for index in range(5)}
    wait_for(lambda: b.stats()["completed"] == 5, timeout=30, what="B's items while A is down")
    assert "unavailable" in worker.log()

    a = services.endpoint("a", port_a, b.url)
    a_items = {a.enqueue(f"a{index}".encode(), 100): reference(f"a{index}".encode(), 100) for index in range(5)}
    results = {item["id"]: item["result"] for item in drain([a, b], 10, timeout=60)}
    assert results == {**a_items, **b_items}


def test_worker_alternates_between_endpoints(services: Services, pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    for index in range(60):
        a.enqueue(f"a{index}".encode(), 10)
        b.enqueue(f"b{index}".encode(), 10)
    services.worker([a, b], processes=1, extra_args=("--kernel", "python"))  # one lane: one job at a time
    wait_for(lambda: a.stats()["completed"] + b.stats()["completed"] >= 40, timeout=30, what="forty jobs done")
    # Each endpoint's claimer asks for the free lane, both at once, and short jobs come many to a claim
    # (taken early): they wait for the lane by turns of their endpoints, so that neither endpoint is
    # starved by the other's batch. (Sixty jobs each: one endpoint's first answer may come late on a
    # loaded machine, but not later than thirty of the other's jobs.)
    done_a, done_b = a.stats()["completed"], b.stats()["completed"]
    assert min(done_a, done_b) >= 0.3 * (done_a + done_b), (done_a, done_b)


LONG = 12_000_000  # iterations: several seconds on the python kernel


def states(endpoint: Endpoint, ids: list[str]) -> list[tuple[str, int]]:
    return [(status["state"], status["attempts"]) for status in (endpoint.work(work_id).json() for work_id in ids)]


def test_a_long_job_that_came_with_no_lane_free_is_given_back(services: Services,
                                                             pair: tuple[Endpoint, Endpoint]) -> None:
    """One lane, both endpoints asked for it at once, both answer with a long job: the second is given back
    at once (its attempt not counted) for an idle worker to take, instead of waiting a job's length."""
    a, b = pair
    ids = {a: [a.enqueue(b"long at a", LONG)], b: [b.enqueue(b"long at b", LONG)]}
    services.worker([a, b], processes=1, extra_args=("--kernel", "python"))
    wait_for(lambda: a.stats()["running"] + b.stats()["running"] == 1
             and a.stats()["workers_heard_from"] + b.stats()["workers_heard_from"] == 2,
             timeout=20, what="one job running, both endpoints asked")
    time.sleep(1.0)  # a job held in the worker would show as running
    both = states(a, ids[a]) + states(b, ids[b])
    assert sorted(both) == [("pending", 0), ("running", 1)], both
    wait_for(lambda: a.stats()["completed"] + b.stats()["completed"] == 2, timeout=60, what="both jobs done")
    assert sorted(states(a, ids[a]) + states(b, ids[b])) == [("completed", 1), ("completed", 1)]


def test_short_jobs_before_do_not_make_a_worker_take_long_ones_early(services: Services) -> None:
    """Short jobs are taken many to a claim; the long ones that follow them are not (their length is told
    by their iterations, not by the short ones' mean)."""
    endpoint = services.endpoint("a")
    services.worker([endpoint], processes=1, extra_args=("--kernel", "python"))
    short = [endpoint.enqueue(f"short {index}".encode(), 10) for index in range(30)]
    wait_for(lambda: endpoint.stats()["completed"] == len(short), timeout=30, what="the short jobs")
    long = [endpoint.enqueue(f"long {index}".encode(), LONG) for index in range(3)]
    wait_for(lambda: endpoint.stats()["running"] >= 1, timeout=10, what="a long job to start")
    time.sleep(1.0)
    assert sorted(states(endpoint, long)) == [("pending", 0), ("pending", 0), ("running", 1)]


def test_idle_worker_exits_and_runs_its_exit_action(services: Services, tmp_path: Path) -> None:
    endpoint = services.endpoint("a")
    marker = tmp_path / "exit-action-ran"
    endpoint.enqueue(b"one job", 10)
    started = time.monotonic()
    worker = services.worker([endpoint], idle_timeout=1.5, extra_args=("--exit-command", f"touch {marker}"))
    wait_for(lambda: not worker.running(), timeout=30, what="the idle worker to exit")
    assert worker.process is not None and worker.process.returncode == 0
    assert marker.exists()
    assert endpoint.stats()["completed"] == 1
    assert time.monotonic() - started >= 1.5


def test_worker_code_is_python_3_9_syntax() -> None:
    """The worker (and the settings code it ships with) runs on the machines' own python3: Amazon Linux 2023
    ships 3.9."""
    import ast

    for source in sorted(path for folder in ("worker", "cli") for path in (REPO / folder).glob("*.py")):
        ast.parse(source.read_text(), filename=str(source), feature_version=(3, 9))


def python_3_9() -> str | None:
    """A Python 3.9 interpreter on this machine, if there is one (pyenv's, on this project's machines)."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for candidate in [*sorted(glob.glob(f"{pyenv_root}/versions/3.9*/bin/python3.9")), shutil.which("python3.9")]:
        # pyenv's shim is on PATH even where it has no 3.9 to run: only an interpreter that starts counts.
        if candidate and subprocess.run([candidate, "-V"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_worker_runs_on_python_3_9(services: Services, tmp_path: Path) -> None:
    """Not only its syntax: a worker under 3.9 serves both endpoints with exact results and exits when idle."""
    interpreter = python_3_9()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter on this machine (the syntax check above still ran)")
    version = subprocess.run([interpreter, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version == "(3, 9)"
    a, b = services.endpoint_pair()
    expected = {}
    for index in range(6):
        payload, iterations = f"py39 job {index}".encode(), 1 + 3_000 * index
        endpoint = (a, b)[index % 2]
        expected[endpoint.enqueue(payload, iterations)] = reference(payload, iterations)
    marker = tmp_path / "idle-exit"
    worker = services.start("worker-py39", [interpreter, "-m", "worker", "--endpoint", a.url, "--endpoint", b.url,
                                            "--processes", "2", "--idle-timeout", "2", "--poll-interval", "0.1",
                                            "--exit-command", f"touch {marker}"], WORKER_ENV)
    results = drain([a, b], len(expected))
    assert {item["id"]: item["result"] for item in results} == expected
    wait_for(lambda: not worker.running(), timeout=30, what="the 3.9 worker to exit when idle")
    assert worker.process is not None and worker.process.returncode == 0, worker.log()
    assert marker.exists()


def test_a_finished_hash_is_kept_even_when_cancelled_after_its_last_digest() -> None:
    """Cancellation is looked at between chunks, never after the last one: the work is done."""
    for iterations in (1, 100, CHECK_EVERY, CHECK_EVERY + 1):  # one chunk: nothing left to cancel
        assert work(b"done", iterations, lambda: True) == reference(b"done", iterations)
    assert work(b"not done", CHECK_EVERY + 2, lambda: True) is None


class FakeEndpoint:
    """An HTTP server standing in for an endpoint, answering the worker routes by a script and
    recording what the worker did (and when), so that a test can time a release."""

    def __init__(self, job_iterations: int, release_delay: float = 0.0) -> None:
        self.events: list[tuple[str, float]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 -- the stdlib's naming
                fields = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                action = self.path.rsplit("/", 1)[-1]
                fake.events.append((action, time.monotonic()))
                if action == "claims":
                    handed_out = sum(event == "claims" for event, _ in fake.events) > 1
                    jobs = [] if handed_out else [{"id": "a-00000000000000aa", "iterations": job_iterations,
                                                   "attempt": 1, "payload_bytes": 8}]
                    if handed_out:
                        time.sleep(min(fields["wait_s"], 1.0))
                    manifest = {"jobs": jobs, "lease_seconds": 30, "pending": 0, "waited": True}
                    self.answer(json.dumps(manifest).encode() + b"\n" + (b"" if handed_out else b"fake job"))
                    return
                if action == "release":
                    time.sleep(release_delay)
                items = fields.get("leases") or fields.get("results") or []
                self.answer(json.dumps({"answers": ["done"] * len(items), "released": 0,
                                        "lease_seconds": 30}).encode())
                fake.events.append((f"{action} answered", time.monotonic()))

            def answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def actions(self) -> list[str]:
        return [event for event, _ in self.events]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_stopping_worker_gives_its_jobs_back_before_it_exits(services: Services) -> None:
    """Stopped while it computes: the worker gives the job back before it exits, however long the
    release takes (well within the HTTP timeout)."""
    fake = FakeEndpoint(job_iterations=500_000_000, release_delay=6.0)
    try:
        worker = services.start("worker", [PYTHON, "-m", "worker", "--endpoint", fake.url, "--processes", "1",
                                           "--poll-interval", "0.1"], WORKER_ENV)
        wait_for(lambda: "claims" in fake.actions(), what="the worker to claim")
        time.sleep(1.0)
        worker.signal_group(signal.SIGTERM)
        wait_for(lambda: not worker.running(), timeout=60, what="the worker to stop")
        exited_at = time.monotonic()
    finally:
        fake.close()
    assert worker.process is not None and worker.process.returncode == 128 + signal.SIGTERM
    answered = [at for event, at in fake.events if event == "release answered"]
    assert answered and answered[0] <= exited_at, fake.actions()
    assert "results" not in fake.actions()
