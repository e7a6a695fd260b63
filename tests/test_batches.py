"""The batched worker API against real endpoints: claims of several jobs within a byte bound,
renewals and results answered item by item, claims that wait for work, cancelled claims."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import requests

from conftest import WORKER_AUTH, Endpoint, Services, reference, wait_for


def post(endpoint: Endpoint, path: str, fields: dict[str, Any], timeout: float = 40) -> requests.Response:
    return requests.post(f"{endpoint.url}{path}", json=fields, headers=WORKER_AUTH, timeout=timeout)


def claim(endpoint: Endpoint, worker: str, token: str, **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest and the payloads of a claim's answer."""
    answer = post(endpoint, "/internal/claims", {"worker": worker, "claim": token, **fields})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/x-dw-jobs"
    line, _, rest = answer.content.partition(b"\n")
    manifest = json.loads(line)
    payloads, offset = [], 0
    for job in manifest["jobs"]:
        payloads.append(rest[offset:offset + job["payload_bytes"]])
        offset += job["payload_bytes"]
    assert offset == len(rest)
    return manifest, payloads


def leases(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": job["id"], "attempt": job["attempt"]} for job in manifest["jobs"]]


def test_a_claim_takes_up_to_max_jobs_oldest_first_within_the_byte_bound(services: Services) -> None:
    endpoint = services.endpoint("a")
    sizes = [1000, 3000, 500, 10, 2000]
    ids = [endpoint.enqueue(bytes([65 + index]) * size, 10 + index) for index, size in enumerate(sizes)]
    manifest, payloads = claim(endpoint, "w", "t1", max_jobs=10, max_bytes=4500)
    assert [job["id"] for job in manifest["jobs"]] == ids[:3]  # 1000 + 3000 + 500 fit, the next one no longer
    assert payloads == [bytes([65 + index]) * size for index, size in enumerate(sizes[:3])]
    assert [job["iterations"] for job in manifest["jobs"]] == [10, 11, 12]
    assert manifest["pending"] == 2 and manifest["lease_seconds"] == 30
    # A single payload larger than the bound still comes, alone.
    manifest, _ = claim(endpoint, "w", "t2", max_jobs=1, max_bytes=1)
    assert [job["id"] for job in manifest["jobs"]] == ids[3:4]
    manifest, _ = claim(endpoint, "w", "t3", max_jobs=5)
    assert [job["id"] for job in manifest["jobs"]] == ids[4:]
    manifest, _ = claim(endpoint, "w", "t4", max_jobs=5)
    assert manifest["jobs"] == [] and manifest["pending"] == 0
    assert endpoint.stats()["running"] == 5


def test_a_repeated_claim_token_gets_the_same_leases_back(services: Services) -> None:
    endpoint = services.endpoint("a")
    ids = [endpoint.enqueue(f"job {index}".encode(), 10) for index in range(4)]
    first, _ = claim(endpoint, "w", "lost-answer", max_jobs=3)
    again, payloads = claim(endpoint, "w", "lost-answer", max_jobs=3)
    assert [job["id"] for job in again["jobs"]] == [job["id"] for job in first["jobs"]] == ids[:3]
    assert [job["attempt"] for job in again["jobs"]] == [1, 1, 1]
    assert payloads == [f"job {index}".encode() for index in range(3)]
    assert endpoint.stats()["pending"] == 1


def test_renewals_are_answered_one_by_one(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "2", "--max-attempts", "5"))
    ids = [endpoint.enqueue(f"r{index}".encode(), 10) for index in range(3)]
    manifest, _ = claim(endpoint, "w", "t1", max_jobs=2)
    held, expiring = leases(manifest)
    # `expiring` is not renewed: its lease runs out and another worker claims it.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        answer = post(endpoint, "/internal/leases/renew", {"worker": "w", "leases": [held]}).json()
        assert answer == {"answers": ["done"], "lease_seconds": 2.0}
        time.sleep(0.5)
    other, _ = claim(endpoint, "v", "t2", max_jobs=5)
    assert {job["id"] for job in other["jobs"]} == {expiring["id"], ids[2]}
    batch = [held, expiring, {"id": held["id"], "attempt": 7}, {"id": "a-0123456789abcdef", "attempt": 1},
             {"id": "b-0123456789abcdef", "attempt": 1}]
    answer = post(endpoint, "/internal/leases/renew", {"worker": "w", "leases": batch}).json()
    assert answer["answers"] == ["done", "leased_elsewhere", "leased_elsewhere", "no_such_item", "no_such_item"]
    assert endpoint.work(held["id"]).json()["state"] == "running"


def test_results_are_accepted_or_refused_one_by_one_and_the_first_one_wins(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "1", "--max-attempts", "1"))
    payloads = [f"result {index}".encode() for index in range(4)]
    ids = [endpoint.enqueue(payload, 100) for payload in payloads]
    manifest, _ = claim(endpoint, "w", "t1", max_jobs=4)
    assert len(manifest["jobs"]) == 4
    wait_for(lambda: endpoint.work(ids[3]).json()["state"] == "failed", timeout=10,
             what="the unrenewed leases of the only attempt to expire")
    right = [reference(payload, 100) for payload in payloads]
    first = [{"id": ids[0], "result": right[0], "duration_s": 0.01},
             {"id": ids[1], "result": right[1]},
             {"id": "a-0123456789abcdef", "result": "0" * 128},  # no such item: refused alone
             {"id": ids[0], "result": "1" * 128}]  # a repeat in the same batch: the first one wins
    answer = post(endpoint, "/internal/results", {"worker": "w", "results": first}).json()
    assert answer == {"answers": ["done", "done", "no_such_item", "completed"]}
    # A late result of an item whose last lease expired (failed) still completes it; a repeat is dropped.
    late = [{"id": ids[3], "result": right[3]}, {"id": ids[1], "result": "2" * 128}]
    assert post(endpoint, "/internal/results", {"worker": "x", "results": late}).json() == {
        "answers": ["done", "completed"]}
    for index in (0, 1, 3):
        status = endpoint.work(ids[index]).json()
        assert (status["state"], status["result"]) == ("completed", right[index])
    assert endpoint.work(ids[2]).json()["state"] == "failed"
    assert endpoint.stats()["completed"] == 3


def test_a_malformed_item_refuses_the_whole_batch_and_changes_nothing(services: Services) -> None:
    endpoint = services.endpoint("a")
    ids = [endpoint.enqueue(f"m{index}".encode(), 10) for index in range(2)]
    manifest, _ = claim(endpoint, "w", "t1", max_jobs=2)
    good = {"id": ids[0], "result": "a" * 128}
    for results, needle in (
        ([good, {"id": ids[1], "result": "xyz"}], "results[1]"),
        ([good, {"id": ids[1]}], "results[1]"),
        ([good, "not an object"], "results[1]"),
        ([], "results"),
        ([good] * 1001, "results"),
    ):
        answer = post(endpoint, "/internal/results", {"worker": "w", "results": results})
        assert answer.status_code == 400 and needle in answer.json()["error"], answer.text
    bad_leases = [{"id": ids[0], "attempt": 1}, {"id": ids[1], "attempt": "1"}]
    answer = post(endpoint, "/internal/leases/renew", {"worker": "w", "leases": bad_leases})
    assert answer.status_code == 400 and "leases[1]" in answer.json()["error"]
    assert endpoint.stats()["completed"] == 0 and endpoint.stats()["running"] == 2
    for fields, needle in (({"max_jobs": 0}, "max_jobs"), ({"max_jobs": 257}, "max_jobs"), ({"wait_s": 31}, "wait_s"),
                           ({"wait_s": "1"}, "wait_s"), ({"kernel": "AVX!", "processes": 1, "capacity": 8}, "kernel"),
                           ({"kernel": "avx2", "capacity": 4}, "processes")):
        answer = post(endpoint, "/internal/claims", {"worker": "w", "claim": "t9", **fields})
        assert answer.status_code == 400 and needle in answer.json()["error"], (fields, answer.text)
    answer = post(endpoint, "/internal/claims", {"worker": "w"})
    assert answer.status_code == 400 and "claim" in answer.json()["error"]


def test_released_jobs_go_back_without_using_an_attempt(services: Services) -> None:
    endpoint = services.endpoint("a")
    ids = [endpoint.enqueue(f"g{index}".encode(), 10) for index in range(2)]
    manifest, _ = claim(endpoint, "w", "t1", max_jobs=2)
    answer = post(endpoint, "/internal/leases/release", {"worker": "w", "leases": leases(manifest) + [
        {"id": ids[0], "attempt": 1}]}).json()
    assert answer == {"answers": ["done", "done", "not_leased"]}
    again, _ = claim(endpoint, "v", "t2", max_jobs=2)
    assert [job["attempt"] for job in again["jobs"]] == [1, 1]


class Waiting:
    """A claim that waits for work, on a thread."""

    def __init__(self, endpoint: Endpoint, worker: str, token: str, wait_s: float, **fields: Any) -> None:
        self.answer: tuple[dict[str, Any], list[bytes]] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at = 0.0

        def run() -> None:
            try:
                self.answer = claim(endpoint, worker, token, wait_s=wait_s, **fields)
            except BaseException as exc:  # noqa: BLE001 -- reported by the test
                self.error = exc
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 40) -> Waiting:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the claim did not end"
        return self


def test_a_waiting_claim_is_answered_when_work_arrives(services: Services) -> None:
    endpoint = services.endpoint("a")
    waiting = Waiting(endpoint, "w", "t1", 20, max_jobs=4)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 1, what="the claim to wait")
    time.sleep(0.5)
    enqueued_at = time.monotonic()
    work_id = endpoint.enqueue(b"wake up", 10)
    waiting.join()
    assert waiting.answer is not None
    manifest, _ = waiting.answer
    assert manifest["jobs"] == [] and manifest["waited"] is True  # woken: its worker claims again at once
    assert waiting.finished_at - enqueued_at < 1.0
    again, payloads = claim(endpoint, "w", "t2", max_jobs=4)
    assert [job["id"] for job in again["jobs"]] == [work_id] and payloads == [b"wake up"]
    # Nothing pending: a claim with no wait is answered at once; one that waits, after its wait.
    started = time.monotonic()
    assert claim(endpoint, "w", "t3")[0]["jobs"] == []
    alone = Waiting(endpoint, "w", "t4", 1.5).join()
    assert alone.answer is not None and alone.answer[0]["waited"] is True
    assert 1.4 < alone.finished_at - alone.started < 5 and time.monotonic() - started > 1.4


def test_claims_over_the_bound_do_not_wait(services: Services) -> None:
    endpoint = services.endpoint("a", extra_args=("--max-waiting-claims", "2"))
    waiting = [Waiting(endpoint, f"w{index}", f"t{index}", 20) for index in range(2)]
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 2, what="two claims to wait")
    started = time.monotonic()
    refused = Waiting(endpoint, "w9", "t9", 20).join()
    assert refused.answer is not None and refused.answer[0]["waited"] is False
    assert refused.finished_at - started < 2
    endpoint.enqueue(b"one", 10)
    for claim_waiting in waiting:
        claim_waiting.join()
    assert endpoint.stats()["waiting_claims"] == 0


def test_a_cancelled_claim_ends_its_wait_and_gives_back_what_its_token_took(services: Services) -> None:
    endpoint = services.endpoint("a")
    waiting = Waiting(endpoint, "w", "stopping", 20)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 1, what="the claim to wait")
    assert post(endpoint, "/internal/claims/cancel", {"worker": "w", "claim": "stopping"}).json() == {"released": 0}
    waiting.join(timeout=5)
    # A claim whose answer the stopping worker never read: cancelling its token gives its jobs back.
    ids = [endpoint.enqueue(f"c{index}".encode(), 10) for index in range(3)]
    claim(endpoint, "w", "unread", max_jobs=2)
    assert post(endpoint, "/internal/claims/cancel", {"worker": "w", "claim": "unread"}).json() == {"released": 2}
    # ... and the token takes nothing afterwards.
    assert claim(endpoint, "w", "unread", max_jobs=2)[0]["jobs"] == []
    manifest, _ = claim(endpoint, "v", "t1", max_jobs=3)
    assert [job["id"] for job in manifest["jobs"]] == ids
    assert [job["attempt"] for job in manifest["jobs"]] == [1, 1, 1]
    assert post(endpoint, "/internal/claims/cancel", {"worker": "v", "claim": "bad token!"}).status_code == 400


def test_a_cancel_ends_its_own_waiting_claim_alone(services: Services) -> None:
    """A worker that calls off its claim (it stops, or it filled up) does not wake the rest of the fleet."""
    endpoint = services.endpoint("a")
    others = [Waiting(endpoint, f"w{index}", f"t{index}", 20) for index in range(3)]
    leaving = Waiting(endpoint, "leaving", "mine", 20)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 4, what="four claims to wait")
    assert post(endpoint, "/internal/claims/cancel", {"worker": "leaving", "claim": "mine"}).json() == {"released": 0}
    leaving.join(timeout=5)
    time.sleep(0.5)
    assert endpoint.stats()["waiting_claims"] == 3
    assert all(other.thread.is_alive() for other in others)
    endpoint.enqueue(b"for the others", 10)
    for other in others:
        other.join()


def test_a_wake_whose_worker_does_not_claim_again_is_passed_on(services: Services) -> None:
    """The claim woken for an item belongs to a worker that will not claim again (it filled up with work
    from the other endpoint meanwhile): the wake goes to the next waiting claim, not to waste."""
    endpoint = services.endpoint("a")
    full = Waiting(endpoint, "full", "t1", 20)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 1, what="the first claim to wait")
    idle = Waiting(endpoint, "idle", "t2", 25)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 2, what="the second claim to wait")
    work_id = endpoint.enqueue(b"somebody take it", 10)
    full.join(timeout=5)  # the longest waiting is woken; its worker does not come back
    idle.join(timeout=10)  # woken in its place within a few seconds, not after its 25 s
    assert idle.answer is not None and idle.answer[0]["jobs"] == [] and idle.finished_at - idle.started < 10
    manifest, _ = claim(endpoint, "idle", "t3")
    assert [job["id"] for job in manifest["jobs"]] == [work_id]
    # A wake that was answered (its worker claimed again) is not passed on: the next claim waits.
    later = Waiting(endpoint, "idle", "t4", 3).join()
    assert later.finished_at - later.started > 2.5


def test_an_endpoint_restart_answers_its_waiting_claims_at_once(services: Services) -> None:
    endpoint = services.endpoint("a")
    waiting = Waiting(endpoint, "w", "t1", 25)
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 1, what="the claim to wait")
    stopping = time.monotonic()
    endpoint.service.stop()
    stopped_in = time.monotonic() - stopping
    waiting.join(timeout=5)
    assert stopped_in < 5, f"the endpoint took {stopped_in:.1f}s to stop behind a waiting claim"
    assert waiting.error is None and waiting.answer is not None and waiting.answer[0]["jobs"] == []
    endpoint.restart()
    assert endpoint.stats()["waiting_claims"] == 0


def test_waiting_claims_share_a_shallow_queue(services: Services) -> None:
    """Work that arrives while several claims wait is shared out, not taken by the first claim."""
    endpoint = services.endpoint("a")
    waiting = [Waiting(endpoint, f"w{index}", f"t{index}", 20, max_jobs=8) for index in range(4)]
    wait_for(lambda: endpoint.stats()["waiting_claims"] == 4, what="four claims to wait")
    for index in range(8):
        endpoint.enqueue(f"s{index}".encode(), 10)
    for claim_waiting in waiting:
        claim_waiting.join()  # woken: each worker claims again at once
    # A worker with 8 free lanes claiming meanwhile takes its share (8 / 5), not everything.
    manifest, _ = claim(endpoint, "greedy", "g1", max_jobs=8)
    assert len(manifest["jobs"]) == 2, manifest
    shares = [len(claim(endpoint, f"w{index}", f"again{index}", max_jobs=8)[0]["jobs"]) for index in range(4)]
    assert sum(shares) == 6 and max(shares) <= 2, shares


def test_stats_show_the_workers_kernels_and_capacity(services: Services) -> None:
    endpoint = services.endpoint("a")
    claim(endpoint, "w1", "t1", kernel="avx512", processes=2, capacity=16)
    claim(endpoint, "w2", "t2", kernel="python", processes=1, capacity=1)
    post(endpoint, "/internal/leases/renew", {"worker": "w3", "leases": [{"id": "a-0123456789abcdef", "attempt": 1}]})
    public = endpoint.stats(public=True)
    assert public["kernels"] == {"avx512": 1, "python": 1, "unknown": 1}
    assert public["capacity_reported"] == 17 and "workers" not in public
    detailed = {worker["id"]: worker for worker in endpoint.stats()["workers"]}
    assert (detailed["w1"]["kernel"], detailed["w1"]["processes"], detailed["w1"]["capacity"]) == ("avx512", 2, 16)
    assert detailed["w3"]["kernel"] is None
