"""A worker's hash rate per core against a bare Python loop, measured in the same run.

1. Bare loop: one process per core runs `out = sha512(out).digest()` for SECONDS; the
   per-core rate is what plain Python can do with every core busy.
2. The worker: jobs big enough to keep every slot busy for about SECONDS go through a real
   endpoint and a real worker (claim over HTTP, lease renewal, result submission). Its
   per-core rate is all iterations completed / wall time from all slots running to the
   last result (polled every 0.25 s, so the window is if anything a little long) / cores;
   the CPU time of its processes over that window shows whether all cores were busy.
3. The bare loop again, then the worker again, and so on; each worker phase is compared with the
   mean of the bare phases around it, so slow drift of the machine cancels out.
    usage: .venv/bin/python -m bench.hash_rate [SECONDS [ROUNDS]]
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from itertools import repeat

from bench._endpoint import REPO, WORKER_KEY, cpu_seconds, group_pids, running_endpoint


def _bare_loop(seconds: float, results: multiprocessing.Queue) -> None:
    sha512 = hashlib.sha512
    out = sha512(b"bench").digest()
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in repeat(None, 100_000):
            out = sha512(out).digest()
        done += 100_000
    results.put(done / (time.perf_counter() - started))


def bare_rate_per_core(cores: int, seconds: float) -> float:
    results: multiprocessing.Queue = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=_bare_loop, args=(seconds, results)) for _ in range(cores)]
    for process in processes:
        process.start()
    rates = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(rates) / cores


def worker_rate_per_core(cores: int, seconds: float, bare_rate: float) -> tuple[float, float]:
    jobs_per_core = 4
    iterations = int(bare_rate * seconds / jobs_per_core)
    with running_endpoint() as (url, _, _):
        for index in range(cores * jobs_per_core):
            request = urllib.request.Request(f"{url}/enqueue?iterations={iterations}", data=f"job {index}".encode(),
                                             method="PUT", headers={"Content-Type": "application/octet-stream"})
            urllib.request.urlopen(request).read()
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--endpoint", url, "--idle-timeout", "600", "--poll-interval", "0.05"],
            cwd=REPO, env={**os.environ, "DW_SECRET": WORKER_KEY}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while json.load(urllib.request.urlopen(f"{url}/stats"))["running"] < cores:
                time.sleep(0.005)
            window_start = time.perf_counter()
            # Sampled only at both ends: measuring must not take CPU from what it measures.
            pids = group_pids(worker.pid)
            cpu_at_start = {pid: cpu_seconds(pid) for pid in pids}
            while json.load(urllib.request.urlopen(f"{url}/stats"))["completed"] < cores * jobs_per_core:
                time.sleep(0.25)
            wall = time.perf_counter() - window_start
            busy = sum(cpu_seconds(pid) - cpu_at_start[pid] for pid in pids)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
    return cores * jobs_per_core * iterations / wall / cores, busy / wall / cores


def main(seconds: float = 10.0, rounds: int = 2) -> None:
    """Bare, worker, bare, worker, ..., bare: each worker phase is compared with the mean of the bare
    phases just before and after it, so the drift of a shared machine cancels out."""
    cores = os.cpu_count() or 1
    print(f"{cores} cores, {seconds:.0f}s per phase, {rounds} worker phases between bare-loop phases")
    bare = [bare_rate_per_core(cores, seconds)]
    print(f"  bare loop, all cores:  {bare[-1] / 1e6:.3f} M hashes/s per core")
    ratios = []
    for _ in range(rounds):
        rate, busy = worker_rate_per_core(cores, seconds, bare[-1])
        print(f"  worker, all cores:     {rate / 1e6:.3f} M hashes/s per core, CPU busy {busy:.0%} of all cores")
        bare.append(bare_rate_per_core(cores, seconds))
        print(f"  bare loop, all cores:  {bare[-1] / 1e6:.3f} M hashes/s per core")
        ratios.append(rate / ((bare[-2] + bare[-1]) / 2))
    ratio = statistics.median(ratios)
    print(f"  worker / neighbouring bare loops: {', '.join(f'{r:.3f}' for r in ratios)}; median {ratio:.3f} "
          f"(target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
