"""Small jobs through `./deploy.sh local`: jobs/s from the first enqueue to the last result pulled,
against the rate at which the same clients enqueue into two endpoints with no workers.

1. No workers: two endpoints (peered, as deploy.sh runs them), CLIENTS threads enqueue JOBS
   jobs of iterations=10 at both (half each), kept-alive connections: the enqueue rate.
2. `./deploy.sh local` of each CHECKOUT given (default: this one), in a fresh state directory:
   a warm-up batch first, until its workers run (the scalers launch them); then the same
   clients enqueue JOBS jobs while one client pulls (pullCompleted?top=1000, both endpoints in
   turn) until every result is in: the rate from the first enqueue to the last result pulled.
   Also the latency of single jobs on the idle deployment (enqueue to result pulled, pulls
   every 2 ms), LATENCY_PROBES of them, one at a time.
The phases run in turn for every round, so they see the same machine.

    usage: .venv/bin/python -m bench.small_jobs [ROUNDS [JOBS [CLIENTS [CHECKOUT ...]]]]
    e.g.   .venv/bin/python -m bench.small_jobs 2 4000 8 . /tmp/dw-base
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._endpoint import REPO, SECRET, free_port, stop_group

ITERATIONS = 10
LATENCY_PROBES = 10


def wait_answering(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(port, "GET", "/stats")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def request(port: int, method: str, path: str, body: bytes = b"",
            conn: http.client.HTTPConnection | None = None) -> bytes:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {answer.status}: {data[:200]!r}")
        return data
    finally:
        if own:
            conn.close()


def enqueue_all(ports: tuple[int, int], jobs: int, clients: int, tag: str) -> tuple[float, float]:
    """(first enqueue started, last enqueue answered), monotonic."""
    started = time.monotonic()
    finished: list[float] = []

    def client(index: int) -> None:
        port = ports[index % 2]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for job in range(index, jobs, clients):
            request(port, "PUT", f"/enqueue?iterations={ITERATIONS}", f"{tag} {job}".encode(), conn)
        conn.close()
        finished.append(time.monotonic())

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return started, max(finished)


def pull_until(ports: tuple[int, int], count: int, timeout: float = 600, pause: float = 0.05) -> float:
    """Pulls until `count` results arrived, `pause` seconds after a pull that was not full;
    returns when the last one did (monotonic)."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for port in ports]
    got, turn = 0, 0
    deadline = time.monotonic() + timeout
    while got < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got} of {count} results after {timeout:g}s")
        results = json.loads(request(ports[turn % 2], "POST", "/pullCompleted?top=1000", b"", conns[turn % 2]))
        got += len(results)
        turn += 1
        if len(results) < 1000 and got < count:
            time.sleep(pause)
    for conn in conns:
        conn.close()
    return time.monotonic()


def enqueue_only_rate(jobs: int, clients: int) -> float:
    with tempfile.TemporaryDirectory(prefix="dw-bench-") as directory:
        ports = (free_port(), free_port())
        env = {**os.environ, "DW_SECRET": SECRET}
        processes = [subprocess.Popen(
            [sys.executable, "-m", "endpoint", "--node-id", node, "--port", str(port), "--db",
             f"{directory}/{node}.sqlite3", "--peer", f"http://127.0.0.1:{peer}", "--log-level", "WARNING"],
            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for node, port, peer in (("a", ports[0], ports[1]), ("b", ports[1], ports[0]))]
        try:
            for port in ports:
                wait_answering(port)
            started, done = enqueue_all(ports, jobs, clients, "enqueue only")
            return jobs / (done - started)
        finally:
            for process in processes:
                os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                process.wait(30)


def deployment_rates(checkout: Path, jobs: int, clients: int) -> tuple[float, float, list[float]]:
    """(jobs/s first enqueue to last result pulled, jobs/s of the enqueues meanwhile, single-job
    latencies in seconds)."""
    with tempfile.TemporaryDirectory(prefix="dw-bench-deploy-") as state, \
            open(Path(state) / "deploy.out", "wb") as log:
        ports = (free_port(), free_port())
        deployment = subprocess.Popen(
            ["./deploy.sh", "local", "--port-a", str(ports[0]), "--port-b", str(ports[1]), "--scale-after", "0",
             "--idle-timeout", "120"], cwd=checkout, env={**os.environ, "DW_STATE_DIR": state},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for port in ports:
                wait_answering(port, timeout=120)
            warm = 200
            enqueue_all(ports, warm, clients, "warm-up")
            pull_until(ports, warm, timeout=300)
            latencies = []
            for probe in range(LATENCY_PROBES):
                time.sleep(1.0)
                enqueued = time.monotonic()
                request(ports[probe % 2], "PUT", f"/enqueue?iterations={ITERATIONS}", b"probe %d" % probe)
                latencies.append(pull_until(ports, 1, pause=0.002) - enqueued)
            pulled_at: list[float] = []
            puller = threading.Thread(target=lambda: pulled_at.append(pull_until(ports, jobs)))
            puller.start()
            started, enqueued = enqueue_all(ports, jobs, clients, "timed")
            puller.join()
            return jobs / (pulled_at[0] - started), jobs / (enqueued - started), latencies
        finally:
            stop_group(deployment, signal.SIGINT, 90)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    checkouts = [Path(path).resolve() for path in sys.argv[4:]] or [REPO]
    print(f"{jobs} jobs of iterations={ITERATIONS}, {clients} clients at both endpoints, {rounds} round(s)")
    for round_number in range(1, rounds + 1):
        baseline = enqueue_only_rate(jobs, clients)
        print(f"round {round_number}: enqueue only, no workers: {baseline:7.0f} jobs/s", flush=True)
        for checkout in checkouts:
            rate, enqueue_rate, latencies = deployment_rates(checkout, jobs, clients)
            print(f"round {round_number}: ./deploy.sh local of {checkout}: {rate:7.0f} jobs/s enqueue to last pull "
                  f"= {rate / baseline:.2f}x (the enqueues meanwhile {enqueue_rate:.0f}/s); single job on the idle "
                  f"deployment: median "
                  f"{1000 * statistics.median(latencies):.0f} ms, max {1000 * max(latencies):.0f} ms", flush=True)


if __name__ == "__main__":
    main()
