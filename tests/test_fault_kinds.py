"""Fault kinds of the soak (bench/soak.py) that no other test covers on their own: an endpoint paused
(SIGSTOP) past the lease, a single worker slot killed, the link between the endpoints cut and restored,
and clients that never read their answers."""

from __future__ import annotations

import signal
import time

import requests

from conftest import WORKER_AUTH, Services, reference, wait_for


def test_an_endpoint_paused_past_the_lease_leaves_the_job_with_its_worker(services: Services) -> None:
    """While the endpoint is stopped its workers cannot renew: when it resumes, their leases get a full
    lease to renew in, as after a restart, and no attempt is used up or handed to another worker."""
    endpoint = services.endpoint("a", extra_args=("--lease-seconds", "2", "--max-attempts", "1"))
    payload, iterations = b"outlives a pause of its endpoint", 9_000_000  # seconds of hashing
    work_id = endpoint.enqueue(payload, iterations)
    worker = services.worker([endpoint], processes=1, worker_id="paused-through")
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
    wait_for(lambda: endpoint.work(work_id).json()["state"] == "completed", timeout=90, what="the job to complete")
    status = endpoint.work(work_id).json()
    assert (status["attempts"], status["worker_id"]) == (1, "paused-through")
    assert status["result"] == reference(payload, iterations)
    assert "finishing it anyway" not in worker.log()  # its lease never lapsed
