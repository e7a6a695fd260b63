"""Fault kinds of the soak (bench/soak.py) that no other test covers on their own: an endpoint paused
(SIGSTOP) past the lease, a single worker slot killed, the link between the endpoints cut and restored,
and clients that never read their answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import requests
from test_peer_failures import complete

from bench.soak_cluster import LinkProxy
from conftest import WORKER_AUTH, Services, drain, free_port, group_members, reference, wait_for


def test_an_endpoint_paused_past_the_lease_leaves_the_job_with_its_worker(services: Services) -> None:
    """While the endpoint is stopped its workers cannot renew: when it resumes, their leases get a full
    lease to renew in, as after a restart, and no attempt is used up or handed to another worker."""
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "2", "--max-attempts", "1"))
    payload, iterations = b"outlives a pause of its endpoint", 20_000_000  # 9-35 s in the Python loop
    work_id = endpoint.enqueue(payload, iterations)
    # The Python loop: the native kernel could finish the job within the pause (the test needs it running after).
    worker = services.worker([endpoint], processes=1, worker_id="paused-through", extra_args=("--kernel", "python"))
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "running", what="the worker to claim it")
    endpoint.service.signal_group(signal.SIGSTOP)  # a paused VM, a stopped process: no answers at all
    try:
        time.sleep(5)  # the lease (2 s) is long gone by the clock
    finally:
        endpoint.service.signal_group(signal.SIGCONT)

    status = endpoint.work(work_id).json()
    assert (status["state"], status["attempts"], status["worker_id"]) == ("running", 1, "paused-through"), status
    other = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "another"}, headers=WORKER_AUTH,
                          timeout=10)
    assert other.status_code == 204, other.text  # nothing to claim: the job is still its worker's
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "completed", timeout=180, what="the job to complete")
    status = endpoint.work(work_id).json()
    assert (status["attempts"], status["worker_id"]) == (1, "paused-through")
    assert status["result"] == reference(payload, iterations)
    assert "finishing it anyway" not in worker.log()  # its lease never lapsed


def slots_of(supervisor_pid: int) -> list[int]:
    """A worker's slot processes: the children multiprocessing spawned, not its resource tracker."""
    slots = []
    for child in Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split():
        command = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in command and b"resource_tracker" not in command:
            slots.append(int(child))
    return slots


def test_a_killed_worker_slot_is_replaced_and_its_job_completes_once(services: Services) -> None:
    a, b = services.endpoint_pair(extra_args=("--lease-seconds", "2"))
    worker = services.worker([a, b], processes=1, worker_id="loses-a-slot")
    payload, iterations = b"its slot dies mid-job", 3_000_000
    work_id = a.enqueue(payload, iterations)
    wait_for(lambda: a.work(work_id).json()["state"] == "running", what="the slot to claim it")
    [slot] = slots_of(worker.pid)
    os.kill(slot, signal.SIGKILL)  # the slot alone, mid-job: its supervisor lives on

    wait_for(lambda: any(pid != slot for pid in slots_of(worker.pid)), what="the supervisor to start a new slot")
    wait_for(lambda: a.work(work_id).json()["state"] == "completed", timeout=90, what="the job to complete")
    status = a.work(work_id).json()
    # The supervisor gave the dead slot's job back at once (worker/runner.py): no attempt used.
    assert (status["attempts"], status["worker_id"]) == (1, "loses-a-slot")
    assert drain([a, b], 1) == [{"id": work_id, "result": reference(payload, iterations)}]
    assert a.pull(10) == [] and b.pull(10) == []
    assert worker.running()
    assert "slot 0 exited with code -9; restarting it" in worker.log()


@pytest.mark.parametrize("mode", ["blackhole", "refuse"])
def test_a_cut_link_between_the_endpoints_loses_and_duplicates_nothing(services: Services, mode: str) -> None:
    """The endpoints reach each other only through proxies; the link is cut (connections held with nothing
    passing, or reset), then restored. Meanwhile each serves its own results, and afterwards the peer's
    again, every result once; a token's answer stays what it was."""
    port_a, port_b = free_port(), free_port()
    to_a, to_b = LinkProxy(port_a), LinkProxy(port_b)
    try:
        a = services.endpoint("a", port_a, to_b.url)
        b = services.endpoint("b", port_b, to_a.url)
        expected = {complete(node, f"before the cut {index}".encode()): node.node_id
                    for node in (a, b) for index in range(3)}
        b_item = next(work_id for work_id, node in expected.items() if node == "b")
        assert a.work(b_item).status_code == 200  # through the link: A knows B's node id
        received: list[dict[str, str]] = []
        for proxy in (to_a, to_b):
            proxy.cut(mode)

        cut_answer = requests.post(f"{a.url}/pullCompleted", params={"top": 100, "delivery": "pulled-during-the-cut"},
                                   timeout=30)
        assert cut_answer.status_code == 200, cut_answer.text
        assert {item["id"] for item in cut_answer.json()} == {i for i, node in expected.items() if node == "a"}
        received += cut_answer.json()
        during = {complete(b, f"during the cut {index}".encode()): "b" for index in range(2)}
        expected.update(during)
        unreachable = a.work(b_item)
        assert unreachable.status_code == 503, unreachable.text
        for proxy in (to_a, to_b):
            proxy.restore()

        # A fills up from B again; what is left comes out once, wherever it is pulled.
        received += drain([a, b], len(expected) - len(received), timeout=60)
        assert sorted(item["id"] for item in received) == sorted(expected)
        assert a.pull(100) == [] and b.pull(100) == []
        repeat = requests.post(f"{a.url}/pullCompleted", params={"top": 100, "delivery": "pulled-during-the-cut"},
                               timeout=30)
        assert repeat.headers.get("Delivery-Replayed") == "true" and repeat.json() == cut_answer.json()
    finally:
        to_a.close()
        to_b.close()


def test_clients_that_never_read_their_answers_do_not_stop_the_endpoint(services: Services) -> None:
    """More connections than the endpoint has threads each pipeline requests whose answers are large (the
    repeat of a delivery token's 300 results) and never read them, until the endpoint stops reading from
    them. Everybody else is still answered, and the endpoint's memory stays bounded."""
    endpoint = services.endpoint("a")
    for index in range(300):
        complete(endpoint, f"for the unread answers {index}".encode())
    token = "answered-but-never-read"
    answer = requests.post(f"{endpoint.url}/pullCompleted", params={"top": 1000, "delivery": token}, timeout=30)
    assert len(answer.json()) == 300 and len(answer.content) > 40_000
    request = f"POST /pullCompleted?top=1000&delivery={token} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode()
    memory_before = resident_kib(endpoint.service.pid)
    hogs, blocked = [], 0
    try:
        for _ in range(32):  # the endpoint's threads: 16
            hog = socket.create_connection(("127.0.0.1", endpoint.port))
            for buffer in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                hog.setsockopt(socket.SOL_SOCKET, buffer, 4096)
            hog.setblocking(False)
            hogs.append(hog)
            sent = 0
            try:
                while sent < 5000 * len(request):  # 250 MB of answers owed to each
                    sent += hog.send(request[sent % len(request):])
            except BlockingIOError:
                blocked += 1  # the endpoint stopped reading: its answers to this client are not read
        assert blocked == len(hogs)
        time.sleep(1)
        assert endpoint.stats()["completed"] == 300
        enqueued = requests.put(f"{endpoint.url}/enqueue", params={"iterations": 1}, data=b"x", timeout=10)
        assert enqueued.status_code == 200
        claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "w"}, headers=WORKER_AUTH, timeout=10)
        assert claim.status_code == 200
        assert resident_kib(endpoint.service.pid) - memory_before < 64 * 1024
    finally:
        for hog in hogs:
            hog.close()
    assert requests.get(f"{endpoint.url}/stats", timeout=10).status_code == 200


def resident_kib(pgid: int) -> int:
    """Resident memory of a process group (the endpoint's server and app processes)."""
    total = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
    return total
