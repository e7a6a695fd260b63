"""pullCompleted's cost with a long delivered history: an empty pull and a full one (top=100), at
100,000 and 1,000,000 delivered results (7 days of retention at 0.17 and 1.7 jobs/s).

For each history size it builds a file (delivered rows written straight into SQLite, plus
undelivered ones to take), then measures, alternating A and B in one run:
  * the take as the endpoint runs it, through the writer (commit included), and over HTTP;
  * the take's statement alone (rolled back): held to work_items_undelivered (A, today) and left
    to the planner, which walks work_items_recently_completed, i.e. the whole history (B, before).
    usage: .venv/bin/python -m bench.pull [ROWS ...] [--repeats N]
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from bench._endpoint import running_endpoint
from endpoint.store import UNDELIVERED_SQL, Store

TOP = 100
RESULT = "ab" * 64
DAY = 86_400.0


def build(path: Path, delivered: int, undelivered: int) -> None:
    Store(path, "a", maintenance_interval=3600).close()  # the schema, as the endpoint makes it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    now = time.time()
    total = delivered + undelivered

    def rows() -> Iterator[tuple[object, ...]]:
        for index in range(total):
            at = now - 7 * DAY * (1 - index / total)  # spread over a week, the newest undelivered
            taken = index < delivered
            yield f"a-{index:016x}", at, at, at, RESULT, now if taken else None, "history" if taken else None

    conn.execute("BEGIN")
    conn.executemany(
        """INSERT INTO work_items (id, iterations, payload_bytes, state, attempts, worker_id, created_at,
                                   claimed_at, completed_at, duration_s, result, delivered_at, delivery_id)
           VALUES (?, 1, 16, 'completed', 1, 'w', ?, ?, ?, 0.1, ?, ?, ?)""", rows())
    conn.execute("COMMIT")
    conn.close()


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def statement(conn: sqlite3.Connection, held: bool) -> Callable[[], object]:
    """The take's UPDATE alone, rolled back: what it costs the writer to find the rows."""
    inner = UNDELIVERED_SQL if held else UNDELIVERED_SQL.replace(" INDEXED BY work_items_undelivered", "")
    sql = f"UPDATE work_items SET delivered_at = 1, delivery_id = 'x' WHERE seq IN ({inner}) RETURNING id, result"

    def run() -> object:
        conn.execute("BEGIN IMMEDIATE")
        try:
            return conn.execute(sql, (TOP,)).fetchall()
        finally:
            conn.execute("ROLLBACK")

    return run


def figure(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {statistics.median(ordered):8.3f} ms   p90 {ordered[int(len(ordered) * 0.9)]:8.3f} ms"


def http_pull(url: str) -> Callable[[], object]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def run() -> object:
        connection.request("POST", f"/pullCompleted?top={TOP}")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        return body

    return run


def measure(path: Path, repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"A: held to the index": [], "B: planner's choice": []}
    conn = sqlite3.connect(path, isolation_level=None)
    calls = {"A: held to the index": statement(conn, True), "B: planner's choice": statement(conn, False)}
    for _ in range(repeats):  # alternating A and B
        for name, call in calls.items():
            samples[name].append(timed(call))
    conn.close()
    store = Store(path, "a", maintenance_interval=3600)
    try:
        samples["store.take_completed (writer, commit)"] = [
            timed(lambda: store.take_completed(TOP, delivery_id=secrets.token_hex(16))) for _ in range(repeats)]
    finally:
        store.close()
    with running_endpoint("--db", str(path), "--retention-days", "0") as (url, _, _):
        pull = http_pull(url)
        samples["POST /pullCompleted over HTTP"] = [timed(pull) for _ in range(repeats)]
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    print(f"pullCompleted?top={TOP}; {args.repeats} takes of each kind; times in ms, synchronous=FULL")
    for delivered in args.rows:
        with tempfile.TemporaryDirectory(prefix="dw-bench-pull-") as directory:
            path = Path(directory) / "a.sqlite3"
            # Enough undelivered results for every full take below (statement takes roll back).
            undelivered = 2 * args.repeats * TOP + TOP
            started = time.perf_counter()
            build(path, delivered, undelivered)
            print(f"\n{delivered:,} delivered results (+{undelivered:,} undelivered), built in "
                  f"{time.perf_counter() - started:.0f}s, {path.stat().st_size / 1e6:.0f} MB")
            for label, full in (("full pull (100 results)", True), ("empty pull", False)):
                if not full:
                    with sqlite3.connect(path) as conn:  # nothing left to deliver: an empty pull
                        conn.execute("UPDATE work_items SET delivered_at = ?, delivery_id = 'history' "
                                     "WHERE delivered_at IS NULL", (time.time(),))
                print(f"  {label}:")
                for name, samples in measure(path, args.repeats).items():
                    print(f"    {name:40s} {figure(samples)}")


if __name__ == "__main__":
    main()
