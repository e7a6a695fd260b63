"""Heavy jobs through one worker process, end to end, per hashing kernel, against the bare Python loop.

For each round and each kernel (the worker forced with --kernel, one slot process): JOBS jobs of
4,000,000 iterations are enqueued at a real endpoint, then the worker starts; its rate is all
iterations / (the last completed_at - the first claimed_at, read from the endpoint's data file):
claim to result, HTTP, leases and lanes included. The bare loop (`out = sha512(out).digest()`,
one process) is timed between the kernels of every round, and each kernel is compared with the
mean of the bare loops around it, so drift of the machine cancels out.

    usage: .venv/bin/python -m bench.worker_rate [ROUNDS [JOBS [KERNELS]]]
    e.g.   .venv/bin/python -m bench.worker_rate 3 32 avx512,avx2,scalar
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from itertools import repeat

from bench._endpoint import REPO, WORKER_KEY, running_endpoint

ITERATIONS = 4_000_000


def bare_loop_rate(seconds: float = 3.0) -> float:
    sha512 = hashlib.sha512
    out = sha512(b"bench").digest()
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in repeat(None, 100_000):
            out = sha512(out).digest()
        done += 100_000
    return done / (time.perf_counter() - started)


def enqueue(url: str, index: int) -> None:
    request = urllib.request.Request(f"{url}/enqueue?iterations={ITERATIONS}", data=b"heavy job %d" % index,
                                     method="PUT")
    urllib.request.urlopen(request, timeout=10).read()


def worker_rate(kernel: str, jobs: int) -> tuple[float, str]:
    """Hashes per second of one worker process, claim to result, and the kernel it logged."""
    with running_endpoint() as (url, _, directory):
        for index in range(jobs):
            enqueue(url, index)
        log_path = directory / "worker.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "--endpoint", url, "--processes", "1", "--kernel", kernel,
                 "--idle-timeout", "600"], cwd=REPO, env={**os.environ, "DW_SECRET": WORKER_KEY},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            db = sqlite3.connect(f"file:{directory}/a.sqlite3?mode=ro", uri=True)
            deadline = time.monotonic() + 3600
            while db.execute("SELECT count(*) FROM work_items WHERE state = 'completed'").fetchone()[0] < jobs:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"the worker did not finish: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
            first, last = db.execute("SELECT min(claimed_at), max(completed_at) FROM work_items").fetchone()
            db.close()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
        logged = next((line.split("hashing kernel: ", 1)[1].split(",")[0]
                       for line in log_path.read_text().splitlines() if "hashing kernel: " in line), "?")
    return jobs * (ITERATIONS - 1) / (last - first), logged


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 16 * (os.cpu_count() or 1)
    kernels = sys.argv[3].split(",") if len(sys.argv) > 3 else ["avx512", "avx2", "scalar"]
    print(f"{jobs} jobs of {ITERATIONS:,} iterations through one worker process, {rounds} round(s)")
    ratios: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    for round_number in range(1, rounds + 1):
        bare = [bare_loop_rate()]
        for kernel in kernels:
            rate, logged = worker_rate(kernel, jobs)
            bare.append(bare_loop_rate())
            ratio = rate / statistics.mean(bare[-2:])
            ratios[kernel].append(ratio)
            print(f"round {round_number}: {kernel:>6} (ran {logged}): {rate / 1e6:6.2f} M hashes/s end to end, "
                  f"bare loop {bare[-2] / 1e6:.2f}-{bare[-1] / 1e6:.2f} M/s: {ratio:5.2f}x", flush=True)
    for kernel, values in ratios.items():
        median = statistics.median(values)
        print(f"{kernel:>6}: {min(values):.2f}-{max(values):.2f}x the bare loop (median {median:.2f}x)")


if __name__ == "__main__":
    main()
