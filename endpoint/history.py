"""What the dashboard and GET /metrics read beyond the queue itself: counters, samples, the scaler's runs.

Part of the storage layer (the SQL lives here and in store.py, nowhere else): the counters that
only grow (event_counts, duration_buckets: kept by schema.sql's triggers and by the store in
the same transaction as what they count), a sample per minute for the charts, and the record of
the scaler's runs with its circuit breaker. Every write goes through the file's single writer;
samples and runs are pruned after the retention period, and runs are bounded in number too.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from endpoint.writer import Writer

SAMPLE_INTERVAL_S = 60
HISTORY_DAYS_WHEN_KEPT_FOREVER = 7.0  # --retention-days 0 keeps results forever, never the history
SCALER_RUNS_KEPT = 20_000  # a scaler run every 2 s (./deploy.sh local) makes 43,200 a day
PRUNE_BATCH = 1000
ERRORS_PER_RUN = 20
ERROR_CHARS = 500
HISTOGRAMS = ("job_run", "time_to_result")
BREAKER_STATES = ("closed", "half-open", "open")
# Counted in the same transaction as what they count: the name in event_counts.
COUNT_SQL = "UPDATE event_counts SET value = value + ? WHERE name = ?"
SAMPLE_COLUMNS = ("at", "enqueued_total", "completed_total", "failed_total", "delivered_total", "pending", "running",
                  "oldest_pending_age_s", "workers_heard_from")
RUN_COLUMNS = ("run_id", "recorded_at", "reason", "needed", "decided", "allowed", "launched", "provisioned",
               "terminated", "ready", "booting", "breaker", "launch_failures", "provisioning_failures", "errors")


def count_event(conn: sqlite3.Connection, name: str, amount: int) -> None:
    """Add to one of event_counts' counters (inside a write op)."""
    if amount:
        conn.execute(COUNT_SQL, (amount, name))


@dataclass(frozen=True)
class ScalerEvent:
    """One outcome of a scaler run that the circuit breaker counts, in the order they happened."""

    kind: str  # "launch_failure", "provisioning_failure" or "success"
    message: str = ""


EVENT_KINDS = ("launch_failure", "provisioning_failure", "success")


@dataclass(frozen=True)
class ScalerRun:
    """A scaler run as the scaler posts it: its decision, and what became of it so far. The scaler
    posts the whole record again as the run goes on; `events` only grows."""

    run_id: str
    reason: str
    needed: int
    decided: int
    allowed: int
    ready: int
    booting: int
    breaker: str
    breaker_threshold: int
    launched: int = 0
    provisioned: int = 0
    terminated: int = 0
    events: tuple[ScalerEvent, ...] = field(default_factory=tuple)


class History:
    def __init__(self, writer: Writer, reader: Callable[[], sqlite3.Connection], node_id: str,
                 retention_days: float) -> None:
        self._writer = writer
        self._reader = reader
        self.node_id = node_id
        self.keep_s = (retention_days or HISTORY_DAYS_WHEN_KEPT_FOREVER) * 86_400
        self._last_sample = 0

    # -- counters ----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return dict(self._reader().execute("SELECT name, value FROM event_counts").fetchall())

    def buckets(self) -> dict[str, list[tuple[float, int, float]]]:
        """Per histogram: (upper bound in seconds, items in that bucket alone, their sum), by bound."""
        rows = self._reader().execute(
            "SELECT histogram, le, items, total_s FROM duration_buckets ORDER BY histogram, le").fetchall()
        found: dict[str, list[tuple[float, int, float]]] = {name: [] for name in HISTOGRAMS}
        for histogram, le, items, total in rows:
            found[histogram].append((le, items, total))
        return found

    # -- samples -----------------------------------------------------------------------------

    def sample_if_due(self, figures: Callable[[], dict[str, Any]], now: float | None = None) -> bool:
        """Write this minute's sample once (a restart within the minute writes none again)."""
        now = time.time() if now is None else now
        minute = int(now // SAMPLE_INTERVAL_S) * SAMPLE_INTERVAL_S
        if minute <= self._last_sample:
            return False
        stats = figures()
        totals = self.counters()
        durations = json.dumps({name: [items for _, items, _ in bucket] for name, bucket in self.buckets().items()})
        row = (minute, totals.get("enqueued", 0), totals.get("completed", 0), totals.get("failed", 0),
               totals.get("delivered", 0), stats["pending"], stats["running"], stats["oldest_pending_age_s"],
               len(stats["workers"]), durations)
        placeholders = ", ".join("?" * len(row))
        self._writer.run(lambda conn: conn.execute(
            f"INSERT OR IGNORE INTO samples ({', '.join(SAMPLE_COLUMNS)}, durations) VALUES ({placeholders})", row),
            durable=False)  # a sample lost in a crash is a gap in a chart
        self._last_sample = minute
        return True

    def samples(self, since: float) -> list[dict[str, Any]]:
        rows = self._reader().execute(f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM samples WHERE at >= ? ORDER BY at",
                                      (int(since),)).fetchall()
        return [dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows]

    def durations_at(self, at: float) -> dict[str, list[int]] | None:
        """The histograms' bucket items of the first sample at or after `at`, if there is one."""
        row = self._reader().execute("SELECT durations FROM samples WHERE at >= ? ORDER BY at LIMIT 1",
                                     (int(at),)).fetchone()
        return json.loads(row[0]) if row else None

    # -- the scaler's runs -------------------------------------------------------------------

    def record_run(self, run: ScalerRun) -> None:
        """Write a run's record and apply its new outcomes to the circuit breaker, once each: a repeat of
        the same record (a retry) changes nothing."""

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute("INSERT OR IGNORE INTO scaler (node_id) VALUES (?)", (self.node_id,))
            before = conn.execute("SELECT events_applied, launched, provisioned, terminated FROM scaler_runs "
                                  "WHERE run_id = ?", (run.run_id,)).fetchone()
            if before is None:
                self._insert_run(conn, run, now)
                before = (0, 0, 0, 0)
            applied, launched, provisioned, terminated = before
            for name, old, new in (("scaler_launched", launched, run.launched),
                                   ("scaler_provisioned", provisioned, run.provisioned),
                                   ("scaler_terminated", terminated, run.terminated)):
                count_event(conn, name, max(0, new - old))
            errors = json.loads(conn.execute("SELECT errors FROM scaler_runs WHERE run_id = ?",
                                             (run.run_id,)).fetchone()[0])
            for event in run.events[applied:]:
                self._apply_event(conn, run.run_id, event, run.breaker_threshold, now, errors)
            conn.execute(
                """UPDATE scaler_runs SET updated_at = ?, launched = max(launched, ?),
                   provisioned = max(provisioned, ?), terminated = max(terminated, ?), errors = ?,
                   events_applied = max(events_applied, ?)
                   WHERE run_id = ?""",
                (now, run.launched, run.provisioned, run.terminated, json.dumps(errors[-ERRORS_PER_RUN:]),
                 len(run.events), run.run_id))

        self._writer.run(op)

    def _insert_run(self, conn: sqlite3.Connection, run: ScalerRun, now: float) -> None:
        conn.execute(
            """INSERT INTO scaler_runs (run_id, recorded_at, updated_at, reason, needed, decided, allowed, ready,
                                        booting, breaker)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (run.run_id, now, now, run.reason, run.needed, run.decided, run.allowed, run.ready, run.booting,
             run.breaker))
        count_event(conn, "scaler_runs", 1)
        conn.execute("UPDATE scaler SET last_run_at = ?, last_decision = ?, breaker_open = ? WHERE node_id = ?",
                     (now, run.reason, int(run.breaker == "open"), self.node_id))

    def _apply_event(self, conn: sqlite3.Connection, run_id: str, event: ScalerEvent, threshold: int, now: float,
                     errors: list[str]) -> None:
        if event.kind == "success":
            conn.execute("UPDATE scaler SET consecutive_failures = 0, breaker_open = 0 WHERE node_id = ?",
                         (self.node_id,))
            return
        message = event.message[:ERROR_CHARS]
        errors.append(message)
        column = "launch_failures" if event.kind == "launch_failure" else "provisioning_failures"
        conn.execute(f"UPDATE scaler_runs SET {column} = {column} + 1 WHERE run_id = ?", (run_id,))
        count_event(conn, f"scaler_{column}", 1)
        # The failure that reaches the threshold opens the breaker now, not at the next run.
        conn.execute(
            """UPDATE scaler SET consecutive_failures = consecutive_failures + 1, last_failure_at = ?, last_error = ?,
               breaker_open = (consecutive_failures + 1 >= ?) WHERE node_id = ?""",
            (now, message, threshold, self.node_id))

    def reset_breaker(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO scaler (node_id) VALUES (?)", (self.node_id,))
            conn.execute("UPDATE scaler SET consecutive_failures = 0, breaker_open = 0, breaker_reset_at = ? "
                         "WHERE node_id = ?", (time.time(), self.node_id))

        self._writer.run(op)

    def runs(self, limit: int) -> list[dict[str, Any]]:
        """The latest runs, newest first."""
        rows = self._reader().execute(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM scaler_runs INDEXED BY scaler_runs_recorded "
            "ORDER BY recorded_at DESC LIMIT ?", (limit,)).fetchall()
        runs = [dict(zip(RUN_COLUMNS, row, strict=True)) for row in rows]
        for run in runs:
            run["errors"] = json.loads(run["errors"])
        return runs

    def fleet(self, since: float, bin_s: int) -> list[dict[str, Any]]:
        """The cluster's workers as the scaler's runs saw them, per `bin_s` seconds: the most at once,
        and the launches and terminations."""
        rows = self._reader().execute(
            """SELECT CAST(recorded_at / :bin AS INTEGER) * :bin AS at, max(ready + booting), max(ready),
                      sum(launched), sum(terminated), sum(launch_failures + provisioning_failures)
               FROM scaler_runs INDEXED BY scaler_runs_recorded WHERE recorded_at >= :since
               GROUP BY 1 ORDER BY 1""", {"bin": bin_s, "since": since}).fetchall()
        names = ("at", "workers", "ready", "launched", "terminated", "failures")
        return [dict(zip(names, row, strict=True)) for row in rows]

    # -- retention ---------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> int:
        """Delete samples and runs older than the retention period, and runs beyond SCALER_RUNS_KEPT, a
        batch at a time; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.keep_s

        def op(conn: sqlite3.Connection) -> int:
            pruned = conn.execute("DELETE FROM samples WHERE at IN (SELECT at FROM samples WHERE at < ? "
                                  "ORDER BY at LIMIT ?)", (cutoff, PRUNE_BATCH)).rowcount
            oldest_kept = conn.execute("SELECT recorded_at FROM scaler_runs INDEXED BY scaler_runs_recorded "
                                       "ORDER BY recorded_at DESC LIMIT 1 OFFSET ?",
                                       (SCALER_RUNS_KEPT - 1,)).fetchone()
            run_cutoff = max(cutoff, oldest_kept[0]) if oldest_kept else cutoff
            pruned += conn.execute(
                "DELETE FROM scaler_runs WHERE run_id IN (SELECT run_id FROM scaler_runs INDEXED BY "
                "scaler_runs_recorded WHERE recorded_at < ? ORDER BY recorded_at LIMIT ?)",
                (run_cutoff, PRUNE_BATCH)).rowcount
            return pruned

        return self._writer.run(op, durable=False)
