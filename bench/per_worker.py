"""What each worker costs beyond its requests: the endpoint's record of the workers it heard from,
GET /stats, and the scaler's reconcile, with WORKERS workers (default 1,000).

Against one real endpoint, on a fresh data file and on one that also remembers HISTORY workers heard
from in the past (default 100,000: a fleet of a thousand that is replaced every day or so leaves
that many ids in a few months):

* the record: WORKERS workers claim once each (the worker's own client), and the endpoint's store
  writes its contacts to the `workers` table once a second; the cost of one such write of every
  worker's contact, in-process on a copy of the file;
* GET /stats, public and as the scaler reads it (the scaler key, workers heard from within the
  partition deadline + 60 s): time and size;
* the scaler's run (cron/scale.py's Scaler.run_once, in-process) over WORKERS machines, all ready
  and heard from, with this endpoint as its own and as its peer (so both /stats lists), launching
  nothing: the time of the whole run and of its parts.

    usage: .venv/bin/python -m bench.per_worker [WORKERS [HISTORY [ROUNDS]]]
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._endpoint import REPO, SECRET, WORKER_KEY, running_endpoint
from cron.config import parse_args
from cron.policy import decide
from cron.providers import Machine
from cron.scale import Scaler, cluster_view, fetch_stats
from endpoint.secret import scaler_key
from endpoint.store import Store
from worker.client import EndpointClient

SCALER_WINDOW_S = 900 + 60  # what the scaler asks /stats for: --partition-deadline + 60 s


def timed(action: Callable[[], object], rounds: int) -> tuple[float, object]:
    """(median seconds of `rounds` runs, the last result)."""
    times, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def prepared(path: Path, history: int) -> None:
    """A data file that remembers `history` workers last heard from 1 to 6.5 days ago (the history keeps 7)."""
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executescript((REPO / "schema.sql").read_text())
        conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', 'a')")
        conn.executemany("INSERT INTO workers (worker_id, first_seen_at, last_seen_at, jobs_completed) "
                         "VALUES (?, ?, ?, ?)",
                         ((f"i-{index:017x}", now - 86_400 * (1 + 5.5 * index / max(1, history)) - 3600,
                           now - 86_400 * (1 + 5.5 * index / max(1, history)), index % 500)
                          for index in range(history)))
    conn.close()


def heard_from(url: str, workers: int) -> list[str]:
    """`workers` workers claim once each (nothing to claim), as their claims tell the endpoint."""
    ids = [f"i-{index:017x}f" for index in range(workers)]

    def claim(worker_id: str) -> None:
        client = EndpointClient(url, WORKER_KEY, worker_id)
        client.claim(2, wait_s=0.0, report={"kernel": "avx512", "processes": 2, "capacity": 16})
        client.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(claim, ids))
    return ids


def get(url: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        return response.read()


class ListedFleet:
    """A provider whose machines are the workers the endpoint heard from: listing costs nothing here (on
    EC2 it is DescribeInstances, paged), launching is off (--max-launch-per-tick 0)."""

    def __init__(self, ids: list[str]) -> None:
        launched = time.time() - 3600
        self.machines = [Machine(worker_id, "ab"[index % 2], launched, ready=True,
                                 address=f"10.0.{index // 250}.{index % 250 + 1}")
                         for index, worker_id in enumerate(ids)]

    def list(self) -> list[Machine]:
        return list(self.machines)

    def launch(self, count: int, owner: str, intent: str) -> list[Machine]:
        raise AssertionError("a reconcile-only run launches nothing")

    def provision(self, machine: Machine) -> Machine:
        raise AssertionError("every machine is ready")

    def terminate(self, machines: list[Machine], reason: str) -> None:
        raise AssertionError(f"nothing is to be terminated, but: {reason}")


def record_cost(path: Path, ids: list[str], rounds: int) -> float:
    """One write of every worker's contact (the store's maintenance does it once a second), in-process on a
    copy of the file."""
    with tempfile.TemporaryDirectory(prefix="dw-bench-store-") as directory:
        copy = Path(directory) / "a.sqlite3"
        with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        source.close()
        target.close()
        store = Store(copy, "a", maintenance_interval=3600)
        try:
            def flush() -> None:
                now = time.time()
                for worker_id in ids:
                    store._record_contact(worker_id, now)  # noqa: SLF001 -- what each request does
                store._flush_contacts()  # noqa: SLF001 -- what the maintenance thread does every second

            seconds, _ = timed(flush, rounds)
        finally:
            store.close()
    return seconds


def scaler_run(url: str, ids: list[str], directory: Path, rounds: int) -> dict[str, float]:
    secret = directory / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    args = parse_args(["--url", url, "--peer", url, "--state-dir", str(directory / "scaler"), "--secret-file",
                       str(secret), "--max-workers", str(2 * len(ids)), "--max-launch-per-tick", "0",
                       "--log-level", "WARNING"])
    scaler = Scaler(args, ListedFleet(ids))  # type: ignore[arg-type]
    key = scaler_key(SECRET)
    run_s, _ = timed(scaler.run_once, rounds)
    fetch_s, stats = timed(lambda: fetch_stats(url, key, SCALER_WINDOW_S), rounds)
    assert isinstance(stats, dict)
    machines = scaler.provider.list()
    reconcile_s, fleet = timed(lambda: scaler.reconcile(machines, scaler._hearing(stats, stats)), rounds)  # noqa: SLF001
    decide_s, _ = timed(lambda: decide(cluster_view(stats, stats, fleet, "a"), scaler.policy), rounds)
    return {"run": run_s, "fetch one /stats": fetch_s, "reconcile": reconcile_s, "decide": decide_s}


def measure(workers: int, history: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dw-bench-perworker-") as directory:
        path = Path(directory) / "a.sqlite3"
        prepared(path, history)
        with running_endpoint("--db", str(path)) as (url, _, _):
            ids = heard_from(url, workers)
            time.sleep(1.5)  # the maintenance thread writes the contacts
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                rows = conn.execute("SELECT count(*) FROM workers").fetchone()[0]
            public_s, public = timed(lambda: get(f"{url}/stats"), rounds)
            auth = {"Authorization": f"Bearer {scaler_key(SECRET)}"}
            scaler_s, detailed = timed(lambda: get(f"{url}/stats?workers_within={SCALER_WINDOW_S}", auth), rounds)
            listed = len(json.loads(detailed)["workers"])  # type: ignore[arg-type]
            print(f"{workers} workers heard from, {history} remembered from before ({rows} rows in `workers`):")
            print(f"  GET /stats public {1000 * public_s:.1f} ms ({len(public)} bytes); as the scaler reads it "  # type: ignore[arg-type]
                  f"{1000 * scaler_s:.1f} ms ({len(detailed) / 1024:.0f} KiB, {listed} workers listed)")  # type: ignore[arg-type]
            parts = scaler_run(url, ids, Path(directory), rounds)
            print("  scaler run over them, launching nothing: " + ", ".join(f"{name} {1000 * seconds:.1f} ms"
                                                                           for name, seconds in parts.items()))
        print(f"  the record: one write of {workers} contacts {1000 * record_cost(path, ids, rounds):.1f} ms "
              f"(the store's maintenance, once a second while they call in)")
        shutil.rmtree(Path(directory) / "scaler", ignore_errors=True)


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    history = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    print(f"medians of {rounds} rounds")
    for remembered in (0, history):
        measure(workers, remembered, rounds)


if __name__ == "__main__":
    main()
