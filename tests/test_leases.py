"""Stalls and restarts never cost an item: real endpoints, real workers, and real pauses
(SIGSTOP), restarts and lost answers."""

from __future__ import annotations

import http.client
import http.server
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import PYTHON, WORKER_ENV, Endpoint, Services, reference, serving, wait_for


def row(endpoint: Endpoint, work_id: str) -> dict[str, object]:
    with sqlite3.connect(endpoint.db) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM work_items WHERE id = ?", (work_id,)).fetchone())


def test_a_worker_stalled_past_its_last_lease_still_delivers_the_result(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "1", "--max-attempts", "1"))
    payload, iterations = b"stalled on its last attempt", 4_000_000  # a few seconds of Python hashing
    work_id = endpoint.enqueue(payload, iterations)
    worker = services.worker([endpoint], processes=1, extra_args=("--kernel", "python"))
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
    worker.signal_group(signal.SIGSTOP)  # a paused VM: no renewals, no hashing
    try:
        wait_for(lambda: endpoint.work(work_id).json()["state"] == "failed", timeout=15,
                 what="the lease of the only attempt to expire")
    finally:
        worker.signal_group(signal.SIGCONT)
    # Its next renewal hears "not leased" (not "leased elsewhere"): it finishes and the result counts.
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "completed", timeout=60,
             what="the stalled worker's result")
    assert endpoint.work(work_id).json()["result"] == reference(payload, iterations)
    assert "finishing it anyway" in worker.log()


def test_an_endpoint_restart_during_a_running_job_does_not_burn_the_attempt(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "3", "--max-attempts", "1"))
    payload, iterations = b"outlives a restart", 10_000_000
    work_id = endpoint.enqueue(payload, iterations)
    worker = services.worker([endpoint], processes=1, extra_args=("--kernel", "python"))  # outlasts the restart
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
    endpoint.service.stop()
    time.sleep(4)  # the lease expires while the endpoint is down
    endpoint.restart()
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "completed", timeout=90,
             what="the job to complete after the restart")
    status = endpoint.work(work_id).json()
    assert status["attempts"] == 1
    assert status["result"] == reference(payload, iterations)
    assert worker.running()


def test_restarts_that_outlast_the_worker_never_fail_the_item(services: Services) -> None:
    """Three times: the endpoint stops, its worker dies while it is down (so nothing gives the job
    back), the endpoint starts again. The lease nobody renewed since the downtime does not count."""
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "1", "--max-attempts", "1"))
    work_id = endpoint.enqueue(b"a long job, three restarts", 50_000_000)
    for cycle in range(3):
        worker = services.worker([endpoint], processes=1, worker_id=f"cycle-{cycle}")
        wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
        endpoint.service.stop()
        worker.kill()
        endpoint.restart()
        wait_for(lambda: endpoint.work(work_id).json()["state"] != "running", timeout=15,
                 what="the lease carried over the restart to expire")
        status = endpoint.work(work_id).json()
        assert (status["state"], status["attempts"]) == ("pending", 0), status


def test_a_stopping_worker_gives_its_job_back_to_an_endpoint_that_is_restarting(services: Services) -> None:
    endpoint = services.endpoint("a")
    work_id = endpoint.enqueue(b"a long job", 50_000_000)
    worker = services.worker([endpoint], processes=1)
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
    endpoint.service.stop()
    worker.signal_group(signal.SIGTERM)  # stopped while its endpoint is down
    time.sleep(1)
    endpoint.restart()
    wait_for(lambda: not worker.running(), timeout=40, what="the worker to exit")
    status = row(endpoint, work_id)
    assert (status["state"], status["attempts"]) == ("pending", 0), worker.log()


@contextmanager
def losing_first_claim_answer(target: Endpoint) -> Iterator[tuple[str, dict[str, int]]]:
    """An HTTP proxy to `target` that drops the answer to the first claim that leased an item, after
    the endpoint made it: the worker sees its connection closed and never learns of the lease."""
    seen = {"claims": 0, "dropped": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 -- the stdlib's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
            headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
            upstream.request("POST", self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            if self.path == "/internal/claims":
                seen["claims"] += 1
                if answer.status == 200 and not data.startswith(b'{"jobs": []') and not seen["dropped"]:
                    seen["dropped"] += 1
                    self.close_connection = True
                    return
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url, seen


def test_a_claim_whose_answer_was_lost_is_handed_out_again_not_left_to_expire(services: Services) -> None:
    endpoint = services.endpoint("a")  # a 30 s lease: far longer than this test waits
    payload = b"its first claim answer never arrives"
    work_id = endpoint.enqueue(payload, 1000)
    with losing_first_claim_answer(endpoint) as (proxy_url, seen):
        worker = services.start("worker-behind-proxy", [PYTHON, "-m", "worker", "--processes", "1",
                                                        "--poll-interval", "0.1", "--endpoint", proxy_url], WORKER_ENV)
        wait_for(lambda: endpoint.work(work_id).json()["state"] == "completed", timeout=20,
                 what="the item to complete without waiting for its lost lease to expire")
        worker.stop()
    assert seen["dropped"] == 1
    status = endpoint.work(work_id).json()
    assert status["attempts"] == 1  # the repeated claim got the same lease back
    assert status["result"] == reference(payload, 1000)
