"""The dashboard and /metrics on a full store: GET /, GET /details and GET /metrics of an endpoint
pair with 100,000 items each and seven days of history (a sample per minute, a scaler run per
minute), and durable enqueue throughput (wrk: 16 clients, 16 KiB payloads) with and without a
dashboard that reloads every 5 s and a Prometheus that scrapes every 5 s, in alternating runs.
    usage: .venv/bin/python -m bench.dashboard [ITEMS] [SECONDS PER RUN] [ROUNDS]
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench._endpoint import REPO, SECRET, free_port, running_endpoint
from endpoint.secret import operator_key

DAYS = 7
RESULT = "ab" * 64


def fill(path: Path, node: str, items: int, now: float) -> None:
    """A data file as a week of work leaves it: items in every state, a sample and a scaler run per minute."""
    minutes = DAYS * 1440
    with sqlite3.connect(path) as conn:
        conn.executescript((REPO / "schema.sql").read_text())
        conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (node,))
        rows = []
        for seq in range(1, items + 1):
            created = now - DAYS * 86_400 * (1 - seq / items)
            state = ("completed", "completed", "completed", "pending")[seq % 4] if seq % 1000 else "failed"
            done, delivered, failed = state == "completed", state == "completed" and seq % 2, state == "failed"
            rows.append((seq, f"{node}-{seq:016x}", created, state, RESULT if done else None,
                         created + 2 if done else None, 1.5 if done else None, created + 3 if delivered else None,
                         f"t{seq // 100}" if delivered else None, "lease expired" if failed else None, int(failed)))
        conn.executemany(
            """INSERT INTO work_items (seq, id, iterations, payload_bytes, created_at, state, result, completed_at,
                                       duration_s, delivered_at, delivery_id, failed_reason, attempts)
               VALUES (?, ?, 1000, 16384, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", rows)
        conn.executemany("INSERT INTO payloads (seq, data) VALUES (?, zeroblob(1024))",
                         ((row[0],) for row in rows if row[3] != "completed"))
        start = int(now // 60) * 60 - minutes * 60
        buckets = json.dumps({"job_run": [0] * 5 + [3] * 14, "time_to_result": [0] * 6 + [3] * 13})
        conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         ((start + 60 * m, m * 10, m * 9, m // 100, m * 8, 1000 + m % 300, m % 7, m % 90, m % 5,
                           buckets) for m in range(minutes)))
        conn.executemany(
            """INSERT INTO scaler_runs (run_id, recorded_at, updated_at, reason, needed, decided, allowed, launched,
                                        terminated, ready, booting, breaker)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'closed')""",
            ((f"{node}-run-{m}", start + 60 * m, start + 60 * m, "120 pending x 1.5s needs 3 worker(s) to drain in "
              "30s; 2 ready, 0 booting: launching 1", 3, m % 2, m % 2, m % 2, m % 3 == 0, 2, m % 2)
             for m in range(minutes)))


def timed_get(url: str, headers: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def latencies(name: str, url: str, count: int, headers: dict[str, str] | None = None) -> None:
    for _ in range(3):
        timed_get(url, headers)  # warm: the page's queries and the template compiled
    times = sorted(timed_get(url, headers) for _ in range(count))
    print(f"  {name:<16} median {statistics.median(times) * 1000:6.1f} ms   "
          f"p90 {times[int(count * 0.9)] * 1000:6.1f} ms   max {times[-1] * 1000:6.1f} ms   "
          f"({count} requests; target <= 100 ms)")


def wrk(url: str, seconds: int, script: Path) -> float:
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", str(script),
                          f"{url}/enqueue?iterations=1000"], capture_output=True, text=True, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("Requests/sec")).split()[1])


def refresher(url: str, stop: threading.Event, every_s: float = 5.0) -> threading.Thread:
    """A browser tab on the dashboard and a Prometheus scrape, every `every_s` seconds."""

    def run() -> None:
        while not stop.is_set():
            timed_get(f"{url}/")
            timed_get(f"{url}/metrics")
            stop.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main(items: int = 100_000, seconds: int = 10, rounds: int = 3) -> None:
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="dw-bench-dashboard-") as directory, ExitStack() as stack:
        ports = {"a": free_port(), "b": free_port()}
        for node in ports:
            fill(Path(directory) / f"{node}.sqlite3", node, items, now)
        print(f"2 endpoints, {items:,} items each, {DAYS} days of samples and scaler runs (a per minute)")
        urls = {}
        for node, peer in (("a", "b"), ("b", "a")):
            url, _, _ = stack.enter_context(running_endpoint(
                "--node-id", node, "--db", f"{directory}/{node}.sqlite3", "--peer", f"http://127.0.0.1:{ports[peer]}",
                port=ports[node]))
            urls[node] = url
        url = urls["a"]
        login = {"Authorization": "Basic " + base64.b64encode(f"operator:{operator_key(SECRET)}".encode()).decode()}
        latencies("GET /", f"{url}/", 40)
        latencies("GET /details", f"{url}/details", 40, login)
        latencies("GET /metrics", f"{url}/metrics", 40)

        script = Path(directory) / "put.lua"
        payload = Path(directory) / "payload"
        payload.write_bytes(bytes(range(256)) * 64)
        script.write_text(f'wrk.method = "PUT"\nlocal f = io.open("{payload}", "rb"); wrk.body = f:read("*a"); '
                          f'f:close()\nwrk.headers["Content-Type"] = "application/octet-stream"\n')
        print(f"durable enqueues/s, 16 clients, 16 KiB payloads, {seconds} s per run, alternating:")
        plain, watched = [], []
        for round_ in range(rounds):
            for watching in ((False, True) if round_ % 2 == 0 else (True, False)):  # ABBA: no trend favours either
                if not watching:
                    plain.append(wrk(url, seconds, script))
                    continue
                stop = threading.Event()
                thread = refresher(url, stop)
                watched.append(wrk(url, seconds, script))
                stop.set()
                thread.join()
            print(f"  round {round_ + 1}: without {plain[-1]:8.0f}/s   with the dashboard every 5 s "
                  f"{watched[-1]:8.0f}/s   ({watched[-1] / plain[-1]:.3f}x)")
        ratio = statistics.mean(watched) / statistics.mean(plain)
        print(f"  mean: without {statistics.mean(plain):.0f}/s, with {statistics.mean(watched):.0f}/s: {ratio:.3f}x "
              f"(target: within 5 %, >= 0.95x)")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:4]))
