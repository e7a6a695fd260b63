"""No acknowledged work is lost when an endpoint dies, and the live endpoint carries on alone."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import requests

from conftest import Endpoint, Services, drain, reference, wait_for


def test_endpoint_killed_under_enqueue_load_keeps_every_acknowledged_item(services: Services) -> None:
    endpoint = services.endpoint("a")
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        with requests.Session() as session:
            counter = 0
            while not stop.is_set():
                payload = f"client {seed} item {counter}".encode() + os.urandom(512)
                counter += 1
                try:
                    response = session.put(f"{endpoint.url}/enqueue", params={"iterations": 7}, data=payload,
                                           headers={"Content-Type": "application/octet-stream"}, timeout=5)
                except requests.RequestException:
                    continue  # the endpoint is down: this one was never acknowledged
                if response.status_code == 200:
                    with lock:
                        acknowledged[response.json()["id"]] = payload

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 300, timeout=30, what="enqueues to be acknowledged")
        endpoint.service.kill()  # SIGKILL mid-load
        # An answer the server wrote just before it died may still be read by its client a moment
        # later: that one was acknowledged while the endpoint lived. After that, nothing more.
        time.sleep(0.3)
        with lock:
            before_crash = dict(acknowledged)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(acknowledged) == len(before_crash), "nothing can be acknowledged by a dead endpoint"

    endpoint.restart()
    with sqlite3.connect(endpoint.db) as conn:
        stored = dict(conn.execute(
            "SELECT w.id, p.data FROM work_items w JOIN payloads p ON p.seq = w.seq").fetchall())
    missing = set(acknowledged) - set(stored)
    assert not missing, f"{len(missing)} acknowledged items lost"
    assert all(stored[work_id] == payload for work_id, payload in acknowledged.items())
    assert endpoint.stats()["pending"] == len(stored)
    # And the restarted endpoint still serves them to workers.
    services.worker([endpoint], processes=2)
    results = {item["id"]: item["result"] for item in drain([endpoint], len(stored), timeout=120, top=500)}
    assert all(results[work_id] == reference(payload, 7) for work_id, payload in acknowledged.items())


def test_peer_down_live_endpoint_keeps_working(services: Services, pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    services.worker([a, b], processes=2)
    b_item = b.enqueue(b"owned by b", 10)
    wait_for(lambda: b.work(b_item).json()["state"] == "completed", what="B's item to complete")
    assert a.work(b_item).json()["state"] == "completed"  # through the peer: A has heard from B
    b.service.kill()

    # A accepts work and its workers keep completing it with B gone.
    expected = {}
    for index in range(20):
        payload = f"while b is down {index}".encode()
        expected[a.enqueue(payload, 1000)] = reference(payload, 1000)
    started = time.monotonic()
    results = {item["id"]: item["result"] for item in drain([a], len(expected), timeout=60)}
    assert results == expected
    assert time.monotonic() - started < 30
    # A still answers for its own items, and says clearly that B's is out of reach.
    assert a.work(next(iter(expected))).json()["state"] == "completed"
    unreachable = a.work(b_item)
    assert unreachable.status_code == 503
    assert "unreachable" in unreachable.json()["error"]
    # An id that is neither A's nor B's is unknown, B down or not: A knows B's node id from its answers.
    unknown = a.work("zz-0123456789abcdef")
    assert unknown.status_code == 404, unknown.text

    # When B comes back, its result is still there, exactly once.
    b.restart()
    assert drain([a, b], 1) == [{"id": b_item, "result": reference(b"owned by b", 10)}]


def test_a_data_file_deleted_under_a_running_endpoint_refuses_writes_and_loses_nothing(services: Services) -> None:
    endpoint = services.endpoint("a")
    acknowledged = {endpoint.enqueue(f"item {index}".encode(), 3): f"item {index}".encode() for index in range(7)}
    endpoint.db.unlink()  # rm var/a.sqlite3 under the running endpoint
    refused = requests.put(f"{endpoint.url}/enqueue", params={"iterations": 3}, data=b"into a deleted file",
                           headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert refused.status_code == 503, refused.text
    assert refused.json()["outcome"] == "not_stored"
    wait_for(lambda: "was deleted while the endpoint ran; refusing writes" in endpoint.service.log(),
             what="the endpoint to log why it refuses writes")
    assert not endpoint.db.exists()  # no empty file made in its place
    endpoint.service.kill()  # even without a clean stop

    (rescued,) = endpoint.db.parent.glob("a.sqlite3.rescued-*")
    with sqlite3.connect(rescued) as conn:
        saved = dict(conn.execute("SELECT w.id, p.data FROM work_items w JOIN payloads p ON p.seq = w.seq"))
    assert saved == acknowledged
    # The deleted file's WAL, left by the killed process, is set aside, not replayed into a new file.
    endpoint.restart()
    assert endpoint.stats()["pending"] == 0
    endpoint.enqueue(b"a fresh start", 1)
    assert list(endpoint.db.parent.glob("a.sqlite3-wal.orphaned-*"))
