"""Endpoint memory with a large queue: enqueue ITEMS payloads of 16 KiB (1.6 GB at the
default 100,000), then read the resident memory of the endpoint's processes (the server's
supervisor and the worker process that holds the app). Payloads live in SQLite, so the
figure should not grow with the queue. Also times /stats and a claim on the full queue.
    usage: .venv/bin/python -m bench.memory [ITEMS]
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

from bench._endpoint import WORKER_KEY, group_pids, rss_kib, running_endpoint


def enqueue_many(url: str, count: int, clients: int = 8) -> float:
    payload = os.urandom(16 * 1024)
    parts = urlsplit(url)
    remaining = [count]
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        while True:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            connection.request("PUT", "/enqueue?iterations=1000", body=payload,
                               headers={"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def report(label: str, server_pid: int) -> None:
    total_rss = 0
    parts = []
    for pid in sorted(group_pids(server_pid)):
        rss, peak = rss_kib(pid)
        total_rss += rss
        role = "supervisor" if pid == server_pid else "app"
        parts.append(f"{role} pid {pid}: {rss / 1024:.1f} MB (peak {peak / 1024:.1f} MB)")
    print(f"  {label}: {total_rss / 1024:.1f} MB resident in all;  " + ";  ".join(parts))


def main(items: int = 100_000) -> None:
    with running_endpoint() as (url, server, directory):
        report("empty queue", server.pid)
        seconds = enqueue_many(url, items)
        stats = json.load(urllib.request.urlopen(f"{url}/stats"))
        size = sum(path.stat().st_size for path in directory.iterdir()) / 1e9
        print(f"  enqueued {stats['pending']} items of 16 KiB in {seconds:.0f}s ({items / seconds:.0f}/s); "
              f"database {size:.2f} GB")
        report(f"{stats['pending']} items queued", server.pid)
        started = time.perf_counter()
        json.load(urllib.request.urlopen(f"{url}/stats"))
        stats_ms = (time.perf_counter() - started) * 1000
        request = urllib.request.Request(f"{url}/internal/claim", data=b'{"worker": "bench"}', method="POST",
                                         headers={"Authorization": f"Bearer {WORKER_KEY}"})
        started = time.perf_counter()
        assert urllib.request.urlopen(request).status == 200
        claim_ms = (time.perf_counter() - started) * 1000
        print(f"  on the full queue: GET /stats {stats_ms:.1f} ms, claim {claim_ms:.1f} ms")
        report("after /stats and a claim", server.pid)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
