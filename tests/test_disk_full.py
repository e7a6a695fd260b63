"""A full disk: writes are refused as not stored (507, "disk_full"), reads go on, nothing is lost
or corrupted, and the endpoint recovers by itself when space returns.

Real filesystems made for the test: the data directory is a small tmpfs, filled by a file of ours.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from small_filesystem import fill, free_bytes, small_filesystem
from writer_holds import Background, Hold, queued, settle

from conftest import WORKER_AUTH, Endpoint, Services, reference, wait_for
from endpoint.store import DiskFull, Store

DISK_BYTES = 3 * 1024 * 1024
TOKEN_BEFORE, TOKEN_DURING = "pulled-before-the-disk-filled", "pulled-while-the-disk-was-full"


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


def test_workers_heard_from_while_the_disk_is_full_are_not_forgotten(disk: Path) -> None:
    """Their contacts cannot be written meanwhile; were they dropped, /stats would soon call live
    workers silent, and the scaler terminate them."""
    store = Store(disk / "a.sqlite3", "a", maintenance_interval=0.05)
    try:
        filler = fill(disk)
        assert store.claim("computing-worker") is None  # nothing pending: its contact is recorded in memory
        time.sleep(0.5)  # maintenance rounds, each failing to write it
        assert [worker["id"] for worker in store.stats()["workers"]] == ["computing-worker"]
        filler.unlink()
        wait_for(lambda: not store._contacts, what="the contact to be written")
        assert [worker["id"] for worker in store.stats()["workers"]] == ["computing-worker"]
    finally:
        store.close()


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


def test_concurrent_enqueues_that_fill_the_disk_keep_every_acknowledged_item_and_no_refused_one(
        tmp_path: Path) -> None:
    """The store's own writes fill the disk: its WAL grows to the limit, and checkpoints (which must grow
    the data file) fail for want of room. Every enqueue answered with an id is kept, no refused one
    appears, the file stays sound, and room made later is used again."""
    with small_filesystem(tmp_path / "disk", 16 * 1024 * 1024) as disk:
        store = Store(disk / "a.sqlite3", "a", maintenance_interval=3600)
        try:
            # Freed at the end, to see the store recover. As much as a full WAL (1000 pages): what the first
            # checkpoint after a full disk may need to grow the data file by, before the WAL can start over.
            reserve = disk / "reserve"
            reserve.write_bytes(b"\0" * 6 * 1024 * 1024)
            acknowledged: list[str] = []
            refused: list[BaseException] = []
            lock = threading.Lock()

            def enqueuer() -> None:
                refused_in_a_row = 0
                while refused_in_a_row < 20:
                    try:
                        work_id = store.enqueue(os.urandom(16 * 1024), 1).work_id
                    except DiskFull as exc:
                        refused_in_a_row += 1
                        with lock:
                            refused.append(exc)
                        continue
                    refused_in_a_row = 0
                    with lock:
                        acknowledged.append(work_id)

            threads = [threading.Thread(target=enqueuer) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not any(thread.is_alive() for thread in threads)
            assert len(acknowledged) > 100 and refused, (len(acknowledged), len(refused))
            assert store.stats()["pending"] == len(acknowledged)
            reserve.unlink()
            for _ in range(10):  # room again: stored, no restart
                acknowledged.append(store.enqueue(os.urandom(16 * 1024), 1).work_id)
            assert store.stats()["disk_full"] is False
        finally:
            store.close()
        conn = sqlite3.connect(disk / "a.sqlite3")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert sorted(row[0] for row in conn.execute("SELECT id FROM work_items")) == sorted(acknowledged)
            assert conn.execute("SELECT count(*) FROM payloads").fetchone()[0] == len(acknowledged)
        finally:
            conn.close()


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
        pulled = requests.post(f"{endpoint.url}/pullCompleted?top=1&delivery={TOKEN_BEFORE}", timeout=10)
        assert [item["id"] for item in pulled.json()] == [done[2]]

        filler = fill(disk)
        assert_disk_full(enqueue(endpoint, b"no room"))
        assert_disk_full(enqueue(endpoint, os.urandom(1024 * 1024)))
        assert_disk_full(enqueue(endpoint, b"keyed", key="order-1"))
        assert_disk_full(requests.post(f"{endpoint.url}/pullCompleted?top=10", timeout=10))
        assert_disk_full(requests.post(f"{endpoint.url}/pullCompleted?top=10&delivery={TOKEN_DURING}", timeout=10))
        # A client whose answer was lost before the disk filled still gets it: a repeat writes nothing.
        repeat = requests.post(f"{endpoint.url}/pullCompleted?top=10&delivery={TOKEN_BEFORE}", timeout=10)
        assert repeat.json() == pulled.json() and repeat.headers["Delivery-Replayed"] == "true"
        assert_disk_full(post(endpoint, f"/internal/work/{computing}/result",
                              {"worker": "w", "result": reference(b"being computed", 1)}))
        # Reads go on: /stats, /work/<id> with the results it has, none of them handed out.
        stats = endpoint.stats()
        assert (stats["disk_full"], stats["pending"], stats["running"], stats["completed"],
                stats["undelivered"]) == (True, 1, 1, 3, 2)
        for work_id in done:
            view = endpoint.work(work_id).json()
            assert view["result"] == reference(view_payload(done, work_id), 1)
            assert ("delivered_at" in view) == (work_id == done[2])
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
        expected = {work_id: reference(view_payload(done, work_id), 1) for work_id in done[:2]}
        expected[computing] = reference(b"being computed", 1)
        expected[waiting] = reference(b"still pending", 1)
        expected[keyed.json()["id"]] = reference(b"keyed", 1)
        received = requests.post(f"{endpoint.url}/pullCompleted?top=1&delivery={TOKEN_DURING}", timeout=10).json()
        assert len(received) == 1  # refused while the disk was full, so a first pull now
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


def test_an_endpoint_started_on_a_full_disk_says_so_and_starts_once_there_is_room(
        disk: Path, services: Services) -> None:
    db = disk / "a.sqlite3"  # its log stays off the small disk, so that it can say why
    endpoint = services.endpoint("a", extra_args=("--db", str(db)))
    work_id = endpoint.enqueue(b"leased when it stopped", 1)
    assert post(endpoint, "/internal/claim", {"worker": "w"}).headers["X-Work-Id"] == work_id
    endpoint.service.stop()
    # Its WAL checkpointed into the file, so that a start cannot win room by checkpointing it itself.
    assert integrity(db) == "ok" and not db.with_name("a.sqlite3-wal").exists()
    filler = fill(disk)

    endpoint.service.start()
    assert endpoint.service.process is not None
    assert endpoint.service.process.wait(60) != 0
    assert "the disk holding it is full" in endpoint.service.log()
    endpoint.service.wait_gone()

    filler.unlink()
    endpoint.restart()
    assert endpoint.work(work_id).json()["state"] == "running"  # kept, with its lease
    assert endpoint.stats()["disk_full"] is False
    endpoint.service.stop()
    assert integrity(db) == "ok"
