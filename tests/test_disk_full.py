"""A full disk: writes are refused as not stored (507, "disk_full"), reads go on, nothing is lost
or corrupted, and the endpoint recovers by itself when space returns.

Real filesystems made for the test: the data directory is a small tmpfs, filled by a file of ours.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from small_filesystem import fill, free_bytes, small_filesystem
from writer_holds import Background, Hold, queued, settle

from conftest import WORKER_AUTH, Endpoint, Services, reference, wait_for
from endpoint.store import DiskFull, Store

DISK_BYTES = 3 * 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "disk", DISK_BYTES) as mount:
        yield mount


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def complete_by_hand(store: Store, payload: bytes) -> str:
    work_id = store.enqueue(payload, 1).work_id
    claim = store.claim("hand")
    assert claim is not None and claim.work_id == work_id
    store.complete(work_id, "hand", reference(payload, 1), 0.01)
    return work_id


# -- the store and its writer, in this process ---------------------------------------------


def test_a_write_on_a_full_disk_is_not_stored_and_the_writer_recovers_when_space_returns(disk: Path) -> None:
    store = Store(disk / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        done = complete_by_hand(store, b"a result")
        kept = store.enqueue(b"before the disk filled", 1).work_id
        filler = fill(disk)

        with pytest.raises(DiskFull):
            store.enqueue(b"no room", 1)
        with pytest.raises(DiskFull):  # the take is a write too: it hands out nothing
            store.take_completed(10, "d" * 32)
        assert store.stats()["disk_full"] is True
        # Not "outcome unknown": nothing is left to undo, and the writer is still there.
        assert store._writer._queue.qsize() == 0
        assert store.get(kept)["state"] == "pending"
        assert store.get(done)["delivered_at"] is None
        assert store.stats()["undelivered"] == 1

        filler.unlink()
        again = store.enqueue(b"room again", 1).work_id  # no restart, no reopening
        assert store.stats()["disk_full"] is False
        assert [item.work_id for item in store.take_completed(10, "e" * 32)] == [done]
        assert store.stats()["pending"] == 2 and store.get(again)["state"] == "pending"
    finally:
        store.close()
    assert integrity(disk / "a.sqlite3") == "ok"


def test_a_batch_with_a_write_that_spills_onto_a_full_disk_fails_as_a_whole(disk: Path) -> None:
    """A large payload spills pages from SQLite's cache mid-statement: on a full disk SQLite rolls the
    whole transaction back. Every write of that batch is then "not stored, disk full", and none of the
    writes after it runs outside a transaction."""
    store = Store(disk / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        filler = fill(disk)
        hold = Hold(store)  # so that the three writes below make one batch
        hold.entered.wait(10)
        calls = [Background(lambda payload=payload: store.enqueue(payload, 1))
                 for payload in (b"small before", os.urandom(3 * 1024 * 1024), b"small after")]
        queued(store, 3)
        hold.release()
        outcomes = [call.outcome() for call in calls]
        assert [type(outcome) for outcome in outcomes] == [DiskFull] * 3, outcomes
        assert store.stats()["pending"] == 0
        filler.unlink()
        settle(store)
        assert store.stats()["pending"] == 0  # nothing of that batch appeared afterwards
        store.enqueue(b"room again", 1)
        assert store.stats()["pending"] == 1
    finally:
        store.close()
    assert integrity(disk / "a.sqlite3") == "ok"


# -- a real endpoint whose data directory (and log) is on the small disk --------------------


def post(endpoint: Endpoint, path: str, body: dict[str, object]) -> requests.Response:
    return requests.post(f"{endpoint.url}{path}", json=body, headers=WORKER_AUTH, timeout=10)


def enqueue(endpoint: Endpoint, payload: bytes, key: str | None = None) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", **({"Idempotency-Key": key} if key else {})}
    return requests.put(f"{endpoint.url}/enqueue", params={"iterations": 1}, data=payload, headers=headers,
                        timeout=30)


def assert_disk_full(response: requests.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.json()["outcome"] == "not_stored" and response.json()["reason"] == "disk_full"
    assert "disk is full" in response.json()["error"]
    assert response.headers["Retry-After"]


def test_an_endpoint_whose_disk_fills_answers_507_keeps_serving_reads_and_recovers_by_itself(
        disk: Path) -> None:
    services = Services(disk)  # the endpoint's data file and its log file are both on the small disk
    try:
        endpoint = services.endpoint("a")
        done = [endpoint.enqueue(b"done %d" % index, 1) for index in range(3)]
        for work_id in done:
            claim = post(endpoint, "/internal/claim", {"worker": "w"})
            assert claim.headers["X-Work-Id"] == work_id
            assert post(endpoint, f"/internal/work/{work_id}/result",
                        {"worker": "w", "result": reference(claim.content, 1)}).json() == {"stored": True}
        computing = endpoint.enqueue(b"being computed", 1)
        claim = post(endpoint, "/internal/claim", {"worker": "w"})
        assert claim.headers["X-Work-Id"] == computing
        waiting = endpoint.enqueue(b"still pending", 1)

        filler = fill(disk)
        assert_disk_full(enqueue(endpoint, b"no room"))
        assert_disk_full(enqueue(endpoint, os.urandom(1024 * 1024)))
        assert_disk_full(enqueue(endpoint, b"keyed", key="order-1"))
        assert_disk_full(requests.post(f"{endpoint.url}/pullCompleted?top=10", timeout=10))
        assert_disk_full(post(endpoint, f"/internal/work/{computing}/result",
                              {"worker": "w", "result": reference(b"being computed", 1)}))
        # Reads go on: /stats, /work/<id> with the results it has, none of them handed out.
        stats = endpoint.stats()
        assert (stats["disk_full"], stats["pending"], stats["running"], stats["completed"],
                stats["undelivered"]) == (True, 1, 1, 3, 3)
        for work_id in done:
            view = endpoint.work(work_id).json()
            assert view["result"] == reference(view_payload(done, work_id), 1)
            assert "delivered_at" not in view
        assert endpoint.work(waiting).json()["state"] == "pending"
        assert endpoint.service.running()  # its log, on the same full disk, did not stop it

        filler.unlink()
        # No restart: the next writes are stored.
        keyed = enqueue(endpoint, b"keyed", key="order-1")
        assert keyed.status_code == 200 and "Idempotent-Replayed" not in keyed.headers
        assert post(endpoint, f"/internal/work/{computing}/result",
                    {"worker": "w", "result": reference(b"being computed", 1)}).json() == {"stored": True}
        assert endpoint.stats()["disk_full"] is False
        services.worker([endpoint])
        expected = {work_id: reference(view_payload(done, work_id), 1) for work_id in done}
        expected[computing] = reference(b"being computed", 1)
        expected[waiting] = reference(b"still pending", 1)
        expected[keyed.json()["id"]] = reference(b"keyed", 1)
        received: list[dict[str, str]] = []
        wait_for(lambda: received.extend(endpoint.pull(100)) or len(received) >= len(expected), timeout=60,
                 what="every result")
        assert sorted(item["id"] for item in received) == sorted(expected)  # each once
        assert {item["id"]: item["result"] for item in received} == expected
        assert "writes are stored again" in endpoint.service.log()
    finally:
        services.stop_all()
    assert integrity(disk / "a.sqlite3") == "ok"
    assert free_bytes(disk) > 0


def view_payload(done: list[str], work_id: str) -> bytes:
    return b"done %d" % done.index(work_id)
