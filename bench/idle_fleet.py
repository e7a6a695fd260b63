"""What an idle fleet costs an endpoint, and how fast new work reaches it: waiting claims vs polling.

N simulated idle workers (threads in this process, each with the worker's own client,
worker/client.py) claim from one real endpoint:

* wait: one claim per worker that waits at the endpoint for work (`--claim-wait`, the worker's
  way now), and claims again when answered;
* poll: no waiting, each worker's 2 slots asking every 0.5 s (the worker's way before).

For each, the endpoint's CPU (all its processes) over WINDOW seconds of an idle fleet, then
PROBES jobs enqueued one at a time while the fleet waits: the time from the enqueue to the
claim (created_at to claimed_at in the data file). The modes alternate, ROUNDS times.

    usage: .venv/bin/python -m bench.idle_fleet [WORKERS [WINDOW [ROUNDS [PROBES]]]]
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import sys
import threading
import time
import urllib.request

from bench._endpoint import WORKER_KEY, cpu_seconds, group_pids, running_endpoint
from worker.client import EndpointClient, EndpointDown, Rejected

POLL_INTERVAL_S = 0.5
SLOTS = 2  # what a 2-vCPU worker ran before: one claiming slot per core


def simulated_worker(url: str, name: str, mode: str, stop: threading.Event) -> None:
    clients = [EndpointClient(url, WORKER_KEY, name) for _ in range(1 if mode == "wait" else SLOTS)]
    report = {"kernel": "sim", "processes": SLOTS, "capacity": SLOTS}
    stop.wait(random.uniform(0, POLL_INTERVAL_S))
    while not stop.is_set():
        for client in clients:
            try:
                answer = client.claim(SLOTS, wait_s=20.0 if mode == "wait" else 0.0, report=report)
            except (EndpointDown, Rejected):
                stop.wait(0.5)
                continue
            if answer.jobs:  # a probe: "done" at once (a simulated job), the fleet stays idle
                client.submit([(job, "0" * 128, 0.0) for job in answer.jobs])
        if mode == "poll":
            stop.wait(POLL_INTERVAL_S * random.uniform(0.8, 1.2))
    for client in clients:
        client.abort()
        client.close()


def endpoint_cpu(pgid: int) -> float:
    return sum(cpu_seconds(pid) for pid in group_pids(pgid))


def run_mode(mode: str, workers: int, window: float, probes: int) -> tuple[float, list[float]]:
    """(endpoint CPU seconds per second, enqueue-to-claim latencies in seconds)."""
    with running_endpoint("--max-connections", str(max(1024, 4 * workers)),
                          "--max-waiting-claims", str(max(512, 2 * workers))) as (url, process, directory):
        stop = threading.Event()
        threads = [threading.Thread(target=simulated_worker, args=(url, f"sim-{index}", mode, stop), daemon=True)
                   for index in range(workers)]
        for thread in threads:
            thread.start()
        time.sleep(3)  # every worker has made its first claim
        cpu_before, started = endpoint_cpu(process.pid), time.monotonic()
        time.sleep(window)
        cpu_per_s = (endpoint_cpu(process.pid) - cpu_before) / (time.monotonic() - started)
        latencies = []
        db = sqlite3.connect(f"file:{directory}/a.sqlite3?mode=ro", uri=True)
        for probe in range(probes):
            request = urllib.request.Request(f"{url}/enqueue?iterations=10", data=b"probe %d" % probe, method="PUT")
            urllib.request.urlopen(request, timeout=10).read()
            time.sleep(random.uniform(0.5, 1.0))
        time.sleep(1.0)
        for created, claimed in db.execute("SELECT created_at, claimed_at FROM work_items").fetchall():
            latencies.append(claimed - created if claimed else float("inf"))
        db.close()
        stop.set()
        for thread in threads:
            thread.join(timeout=1)
    return cpu_per_s, latencies


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    probes = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    print(f"{workers} idle simulated workers ({SLOTS} slots each) on one endpoint; CPU over {window:g} s, "
          f"{probes} probe jobs per run")
    for round_number in range(1, rounds + 1):
        for mode in ("wait", "poll"):
            cpu, latencies = run_mode(mode, workers, window, probes)
            ordered = sorted(latencies)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            print(f"round {round_number}: {mode}: endpoint CPU {100 * cpu:5.1f} % of a core; enqueue to claim "
                  f"p50 {1000 * statistics.median(ordered):6.1f} ms, p95 {1000 * p95:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
