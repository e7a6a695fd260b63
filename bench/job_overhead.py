"""Endpoint overhead per job: one worker connection claims and submits jobs back to back.

Jobs have iterations=1, so almost all the time measured is the endpoint's: the claim
(a durable write that leases the item and returns its payload) and the result submission
(a durable write). Uses the worker's own HTTP client, with its kept-alive connection.
    usage: .venv/bin/python -m bench.job_overhead [JOBS]
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request

from bench._endpoint import WORKER_KEY, running_endpoint
from worker.client import EndpointClient


def main(jobs: int = 2000) -> None:
    with running_endpoint() as (url, _, _):
        for _ in range(jobs):
            request = urllib.request.Request(f"{url}/enqueue?iterations=1", data=b"x" * 64, method="PUT",
                                             headers={"Content-Type": "application/octet-stream"})
            urllib.request.urlopen(request).read()
        client = EndpointClient(url, WORKER_KEY, "bench-worker")
        per_job, claims, submits = [], [], []
        started = time.perf_counter()
        for _ in range(jobs):
            t0 = time.perf_counter()
            job = client.claim()
            t1 = time.perf_counter()
            assert job is not None
            assert client.submit(job, "0" * 128, 0.0)
            t2 = time.perf_counter()
            claims.append(t1 - t0)
            submits.append(t2 - t1)
            per_job.append(t2 - t0)
        wall = time.perf_counter() - started
        assert client.claim() is None

    def ms(values: list[float], q: float) -> str:
        return f"{statistics.quantiles(values, n=100)[int(q) - 1] * 1000:.2f}"

    print(f"{jobs} jobs, claim + submit back to back on one kept-alive connection, synchronous=FULL")
    print(f"  per job:  mean {statistics.mean(per_job) * 1000:.2f} ms   p50 {ms(per_job, 50)} ms   "
          f"p99 {ms(per_job, 99)} ms   ({jobs / wall:.0f} jobs/s)")
    print(f"  claim:    mean {statistics.mean(claims) * 1000:.2f} ms   p99 {ms(claims, 99)} ms")
    print(f"  submit:   mean {statistics.mean(submits) * 1000:.2f} ms   p99 {ms(submits, 99)} ms")
    print(f"  target: <= 2 ms per job -> {'met' if statistics.mean(per_job) <= 0.002 else 'NOT met'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
