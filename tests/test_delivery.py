"""Results reach clients exactly once, from either endpoint."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import requests

from conftest import WORKER_AUTH, Endpoint, Services, drain, pid_alive, reference, wait_for


def test_enqueue_at_a_pull_at_b(services: Services, pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    services.worker([a, b])
    payload = b"enqueued at A"
    work_id = a.enqueue(payload, 1000)
    assert work_id.startswith("a-")
    wait_for(lambda: a.work(work_id).json()["state"] == "completed", what="completion")
    assert b.pull(10) == [{"id": work_id, "result": reference(payload, 1000)}]
    assert a.pull(10) == [] and b.pull(10) == []
    # Pulled results are kept, and either endpoint answers for any id.
    for endpoint in (a, b):
        status = endpoint.work(work_id).json()
        assert status["state"] == "completed"
        assert status["result"] == reference(payload, 1000)
        assert "delivered_at" in status


def test_pull_fills_up_from_the_peer_most_recently_completed_first(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    ids = [a.enqueue(b"first", 1), b.enqueue(b"second", 1), a.enqueue(b"third", 1)]
    for endpoint, work_id in ((a, ids[0]), (b, ids[1]), (a, ids[2])):
        claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "t"}, headers=WORKER_AUTH, timeout=10)
        assert claim.headers["X-Work-Id"] == work_id
        requests.post(f"{endpoint.url}/internal/work/{work_id}/result", json={"worker": "t", "result": "0" * 128},
                      headers=WORKER_AUTH, timeout=10).raise_for_status()
    # A has two, B's one fills up the third place; all in order of completion, newest first.
    assert [item["id"] for item in a.pull(3)] == [ids[2], ids[1], ids[0]]
    assert b.pull(5) == []


def test_concurrent_pulls_at_both_endpoints_deliver_each_result_once(
        services: Services, pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    expected = {}
    for index in range(150):
        endpoint = (a, b)[index % 2]
        payload = os.urandom(64)
        expected[endpoint.enqueue(payload, 50)] = reference(payload, 50)
    services.worker([a, b], processes=2)

    received: list[dict[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def puller(endpoint: Endpoint, top: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                batch = session.post(f"{endpoint.url}/pullCompleted", params={"top": top}, timeout=30).json()
                with lock:
                    received.extend(batch)

    threads = [threading.Thread(target=puller, args=(endpoint, top))
               for endpoint in (a, b) for top in (1, 3, 7, 20)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(received) >= len(expected), timeout=90, what="every result to be pulled")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    counts = Counter(item["id"] for item in received)
    assert [work_id for work_id, count in counts.items() if count > 1] == []
    assert {item["id"]: item["result"] for item in received} == expected


def test_worker_killed_mid_job_is_replaced_and_the_result_appears_once(services: Services) -> None:
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "2"))
    first = services.worker([a, b], worker_id="doomed", extra_args=("--kernel", "python"))  # still running at the kill
    payload = b"long job"
    iterations = 3_000_000  # seconds of hashing: the kill lands mid-job
    work_id = a.enqueue(payload, iterations)
    wait_for(lambda: a.work(work_id).json().get("worker_id") == "doomed", what="the first worker to claim it")
    first.kill()  # SIGKILL to every process of the worker, as when its machine dies

    services.worker([a, b], worker_id="rescuer")
    wait_for(lambda: a.work(work_id).json()["state"] == "completed", timeout=60, what="the job to complete")
    status = a.work(work_id).json()
    assert status["worker_id"] == "rescuer"
    assert status["attempts"] == 2  # the dead worker's lease expired and counted
    results = drain([a, b], 1)
    assert results == [{"id": work_id, "result": reference(payload, iterations)}]
    assert a.pull(10) == [] and b.pull(10) == []


def test_slots_of_a_killed_supervisor_stop_and_give_their_job_back(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "60"))
    worker = services.worker([endpoint], worker_id="orphaning")
    work_id = endpoint.enqueue(b"long job", 50_000_000)
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
    slots = _children(worker.pid)
    assert slots, "the worker should run its job in a slot process"
    os.kill(worker.pid, 9)  # only the supervisor
    # The slot notices, stops computing unobserved, and hands the item back long before
    # its 60 s lease would have expired.
    wait_for(lambda: not any(pid_alive(pid) for pid in slots), timeout=10, what="orphaned slots to exit")
    status = endpoint.work(work_id).json()
    assert status["state"] == "pending"
    assert status["attempts"] == 0


def test_lease_expiring_too_often_marks_the_item_failed(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "0.5", "--max-attempts", "2"))
    work_id = endpoint.enqueue(b"unlucky", 10)
    for attempt in (1, 2):
        claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "flaky"}, headers=WORKER_AUTH,
                              timeout=10)
        assert claim.headers["X-Work-Id"] == work_id
        assert claim.headers["X-Attempt"] == str(attempt)
        wait_for(lambda: endpoint.work(work_id).json()["state"] != "running", timeout=10, what="the lease to expire")
    status = endpoint.work(work_id).json()
    assert status["state"] == "failed"
    assert status["attempts"] == 2
    assert "lease expired" in status["failed_reason"]
    assert endpoint.stats()["failed"] == 1
    nothing = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "flaky"}, headers=WORKER_AUTH, timeout=10)
    assert nothing.status_code == 204


def test_result_submission_is_idempotent_and_the_first_result_wins(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "0.5"))
    work_id = endpoint.enqueue(b"twice", 1)
    post = lambda path, body: requests.post(f"{endpoint.url}{path}", json=body, headers=WORKER_AUTH, timeout=10)  # noqa: E731
    first = post("/internal/claim", {"worker": "slow"})
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "pending", timeout=10, what="the lease to expire")
    second = post("/internal/claim", {"worker": "fast"})
    assert second.headers["X-Work-Id"] == work_id and second.headers["X-Attempt"] == "2"

    # The late worker's renewal is refused: its lease moved on.
    late_renewal = post(f"/internal/work/{work_id}/renew", {"worker": "slow", "attempt": 1})
    assert late_renewal.status_code == 409
    assert late_renewal.json()["reason"] == "leased_elsewhere"  # so the slow worker stops computing
    assert first.headers["X-Attempt"] == "1"

    assert post(f"/internal/work/{work_id}/result", {"worker": "fast", "result": "1" * 128}).json() == {"stored": True}
    assert post(f"/internal/work/{work_id}/result", {"worker": "fast", "result": "1" * 128}).json() == {"stored": False}
    assert post(f"/internal/work/{work_id}/result", {"worker": "slow", "result": "2" * 128}).json() == {"stored": False}
    assert endpoint.work(work_id).json()["result"] == "1" * 128
    assert endpoint.stats()["completed"] == 1
    assert endpoint.pull(5) == [{"id": work_id, "result": "1" * 128}]


def test_released_item_is_claimable_again_without_using_an_attempt(services: Services) -> None:
    endpoint = services.endpoint("a")
    work_id = endpoint.enqueue(b"give back", 1)
    post = lambda path, body: requests.post(f"{endpoint.url}{path}", json=body, headers=WORKER_AUTH, timeout=10)  # noqa: E731
    assert post("/internal/claim", {"worker": "w1"}).headers["X-Attempt"] == "1"
    assert post(f"/internal/work/{work_id}/release", {"worker": "w1", "attempt": 1}).json() == {"released": True}
    again = post("/internal/claim", {"worker": "w2"})
    assert again.headers["X-Work-Id"] == work_id and again.headers["X-Attempt"] == "1"


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
