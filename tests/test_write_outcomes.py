"""What a client hears when the store is slow: "not stored" (503) told apart from "outcome
unknown" (504), Idempotency-Key on enqueue, and no write applied after its caller gave up."""

from __future__ import annotations

import socketserver
import sqlite3
import time
import wsgiref.simple_server
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from writer_holds import Background, Hold, committing_too_long, settle, write_locked

from conftest import SECRET, WORKER_AUTH, Endpoint, Services, serving
from endpoint.app import Limits, make_app
from endpoint.store import Store


def items(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, state, attempts FROM work_items ORDER BY seq").fetchall()


def enqueue(endpoint_url: str, payload: bytes, key: str | None = None, timeout: float = 30) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", **({"Idempotency-Key": key} if key is not None else {})}
    return requests.put(f"{endpoint_url}/enqueue", params={"iterations": 5}, data=payload, headers=headers,
                        timeout=timeout)


# -- Idempotency-Key ---------------------------------------------------------------------------


def test_an_enqueue_retried_with_its_idempotency_key_makes_one_item(services: Services) -> None:
    endpoint = services.endpoint("a")
    first = enqueue(endpoint.url, b"pay once", "7f1c-order-42")
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    work_id = first.json()["id"]
    for key in ("7f1c-order-42", '"7f1c-order-42"'):  # bare, or as the IETF draft's quoted string
        again = enqueue(endpoint.url, b"pay once", key)
        assert (again.status_code, again.json(), again.headers["Idempotent-Replayed"]) == (200, {"id": work_id}, "true")
    assert [row[0] for row in items(endpoint.db)] == [work_id]

    other = enqueue(endpoint.url, b"pay twice?", "7f1c-order-42")
    assert other.status_code == 422, other.text
    assert work_id in other.json()["error"]
    assert enqueue(endpoint.url, b"pay once", "another-key").json()["id"] != work_id
    assert len(items(endpoint.db)) == 2


@pytest.mark.parametrize("key", ["", "has space", "a,b", 'quo"te', "back\\slash", "x" * 256, "caf\u00e9"])
def test_a_malformed_idempotency_key_is_refused_and_stores_nothing(services: Services, key: str) -> None:
    endpoint = services.endpoint("a")
    response = requests.put(f"{endpoint.url}/enqueue?iterations=1", data=b"x",
                            headers={"Idempotency-Key": key.encode("utf-8")}, timeout=10)
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["error"]
    assert items(endpoint.db) == []


# -- 503 "not stored" and no late writes -------------------------------------------------------


def test_a_write_that_could_not_start_is_503_not_stored_and_never_applied_later(services: Services) -> None:
    endpoint = services.endpoint("a")
    with write_locked(endpoint.db):
        started = time.monotonic()
        response = enqueue(endpoint.url, b"while the disk is stuck", timeout=9)
        waited = time.monotonic() - started
        time.sleep(7.5 - waited)  # the lock outlasts the endpoint's wait, not its writer's busy timeout
    assert response.status_code == 503
    assert response.json()["outcome"] == "not_stored"
    assert response.headers["Retry-After"] == "1"
    assert waited < 9  # answered before a 10 s client (the worker's) would give up
    enqueue(endpoint.url, b"afterwards").raise_for_status()  # the writer is through the lock
    assert [row[1] for row in items(endpoint.db)] == ["pending"]  # only the later one


def test_a_claim_whose_caller_timed_out_leaves_no_lease(services: Services) -> None:
    endpoint = services.endpoint("a")
    work_id = endpoint.enqueue(b"claimed by a worker that gave up", 5)
    with write_locked(endpoint.db):
        try:
            answer = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "w"}, headers=WORKER_AUTH,
                                   timeout=6.5).status_code
        except requests.Timeout:
            answer = "timed out"
        time.sleep(1.0)
    assert answer == 503  # answered, and before the caller gave up
    endpoint.enqueue(b"a later write goes through", 1)
    assert items(endpoint.db)[0] == (work_id, "pending", 0)
    status = endpoint.work(work_id).json()
    assert "lease_expires_at" not in status


def test_a_lease_runs_from_the_claims_commit_under_a_slow_writer(services: Services) -> None:
    endpoint = services.endpoint("a")
    work_id = endpoint.enqueue(b"claimed behind a slow writer", 5)
    with write_locked(endpoint.db):
        claim = Background(lambda: requests.post(f"{endpoint.url}/internal/claim", json={"worker": "w"},
                                                 headers=WORKER_AUTH, timeout=10))
        time.sleep(2.0)
    answer = claim.outcome()
    answered_at = time.time()
    assert answer.status_code == 200 and answer.headers["X-Work-Id"] == work_id
    with sqlite3.connect(endpoint.db) as conn:
        (expires,) = conn.execute("SELECT lease_expires_at FROM work_items WHERE id = ?", (work_id,)).fetchone()
    lease = float(answer.headers["X-Lease-Seconds"])
    assert expires >= answered_at + lease - 0.5, f"lease ends {answered_at + lease - expires:.1f}s early"


# -- 504 "outcome unknown" ---------------------------------------------------------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app_store(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    """The real app on a real store over loopback HTTP, in this process: so that the test can
    hold the store's writer inside a transaction and make a commit overrun at will."""
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, write_wait_s=1.5)
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, make_app(store, SECRET, Limits()),
                                               server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    try:
        with serving(server) as url:
            yield url, store
    finally:
        store.close()


def test_an_enqueue_whose_commit_overran_is_504_and_its_retry_finds_the_item(app_store: tuple[str, Store]) -> None:
    url, store = app_store
    heard, hold = committing_too_long(store, lambda: enqueue(url, b"slow disk", "retry-me"))
    assert heard.status_code == 504, heard.text
    assert heard.json()["outcome"] == "unknown"
    retry = Background(lambda: enqueue(url, b"slow disk", "retry-me"))  # at once, while the commit still runs
    hold.release()
    answer = retry.outcome()
    assert answer.status_code == 200 and answer.headers["Idempotent-Replayed"] == "true"
    assert store.get(answer.json()["id"])["state"] == "pending"
    assert store.stats()["pending"] == 1


def test_a_pull_whose_commit_overran_is_504_and_the_results_go_out_again(app_store: tuple[str, Store]) -> None:
    url, store = app_store
    work_id = store.enqueue(b"done", 1).work_id
    store.claim("w")
    store.complete(work_id, "w", "c" * 128, 0.1)
    heard, hold = committing_too_long(store, lambda: requests.post(f"{url}/pullCompleted?top=5", timeout=30))
    assert (heard.status_code, heard.json()["outcome"]) == (504, "unknown")
    hold.release()
    settle(store)
    assert requests.post(f"{url}/pullCompleted?top=5", timeout=30).json() == [{"id": work_id, "result": "c" * 128}]


def test_a_held_writer_answers_503_when_nothing_started(app_store: tuple[str, Store]) -> None:
    url, store = app_store
    hold = Hold(store)
    hold.entered.wait(10)
    response = enqueue(url, b"never started")
    hold.release()
    assert (response.status_code, response.json()["outcome"]) == (503, "not_stored")
    settle(store)
    assert store.stats()["pending"] == 0


def test_the_worker_routes_say_why_a_lease_is_not_held(services: Services) -> None:
    endpoint: Endpoint = services.endpoint("a")
    work_id = endpoint.enqueue(b"x", 1)
    post = lambda path, body: requests.post(f"{endpoint.url}{path}", json=body, headers=WORKER_AUTH, timeout=10)  # noqa: E731
    assert post("/internal/claim", {"worker": "w", "claim": "tok-1"}).headers["X-Work-Id"] == work_id
    assert post("/internal/claim", {"worker": "w", "claim": "tok-1"}).headers["X-Attempt"] == "1"  # same lease
    assert post("/internal/claim", {"worker": "w", "claim": "bad token!"}).status_code == 400
    assert post(f"/internal/work/{work_id}/renew", {"worker": "x", "attempt": 1}).json()["reason"] == "leased_elsewhere"
    assert post(f"/internal/work/{work_id}/result", {"worker": "w", "result": "d" * 128}).json() == {"stored": True}
    moot = post(f"/internal/work/{work_id}/renew", {"worker": "w", "attempt": 1})
    assert (moot.status_code, moot.json()["reason"]) == (409, "completed")
    missing = post("/internal/work/a-0123456789abcdef/renew", {"worker": "w", "attempt": 1})
    assert missing.status_code == 404
