"""What a delivery token costs a pullCompleted, over HTTP on one endpoint (no peer).

Alternating in one run, for an empty queue and for pulls of top=100 results:
  A  a pull without a token (one take; an empty one writes nothing);
  B  a pull with a new token (the take and the token's record in one durable transaction);
  C  a repeat of B's token (read back; writes nothing).
Prints the median and p90 in milliseconds of each.
    usage: .venv/bin/python -m bench.delivery_tokens [ROUNDS]
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from bench._endpoint import running_endpoint
from bench.pull import build

TOP = 100


def timed_pull(connection: http.client.HTTPConnection, query: str) -> tuple[float, int]:
    started = time.perf_counter()
    connection.request("POST", f"/pullCompleted?{query}")
    response = connection.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    assert response.status == 200, body
    return elapsed, body.count(b'"id"')


def figure(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {statistics.median(ordered):6.2f} ms, p90 {ordered[int(len(ordered) * 0.9)]:6.2f} ms"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory(prefix="dw-bench-tokens-") as directory:
        path = Path(directory) / "a.sqlite3"
        build(path, delivered=0, undelivered=2 * TOP * rounds)  # A and B take 100 each per round
        with running_endpoint("--db", str(path)) as (url, _, _):
            parts = urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            for label in ("full", "empty"):
                samples: dict[str, list[float]] = {"A": [], "B": [], "C": []}
                for _ in range(rounds):
                    token = uuid.uuid4().hex
                    for name, query in (("A", f"top={TOP}"), ("B", f"top={TOP}&delivery={token}"),
                                        ("C", f"top={TOP}&delivery={token}")):
                        elapsed, count = timed_pull(connection, query)
                        assert count == (TOP if label == "full" else 0), (label, name, count)
                        samples[name].append(elapsed)
                print(f"{label} pulls (top={TOP}), {rounds} rounds:")
                print(f"  A without a token     {figure(samples['A'])}")
                print(f"  B with a new token    {figure(samples['B'])}")
                print(f"  C repeat of a token   {figure(samples['C'])}")
            connection.close()


if __name__ == "__main__":
    main()
