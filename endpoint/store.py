"""One endpoint's work items, kept in its own SQLite file.

A small storage interface: the HTTP layer calls these methods and never writes SQL.

Writes go through a single writer thread that folds every write waiting at that moment
into one transaction (group commit). A caller gets its answer only after that transaction
is committed -- with ``synchronous=FULL`` that means on disk -- yet one fsync acknowledges
many writes, which is what lets a durable enqueue keep up with many concurrent clients.
One writer also means no SQLITE_BUSY between our own threads. Reads use one connection
per thread and run beside the writer (WAL).
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
STATES = ("pending", "running", "completed", "failed")
RECENT_WINDOW_S = 600.0  # "recent" jobs in /stats: completed within the last ten minutes
ARRIVAL_WINDOW_S = 60.0  # "recent" arrivals in /stats: short, so that the scaler sees a rising stream early
# Items enqueued since a time (from the created_at index), and how many of them are still pending
# (from the pending index).
RECENT_ARRIVALS_SQL = "SELECT count(*) FROM work_items WHERE created_at > ?"
RECENT_ARRIVALS_PENDING_SQL = "SELECT count(*) FROM work_items WHERE state = 'pending' AND created_at > ?"
PRUNE_BATCH = 1000
NODE_ID_PATTERN = re.compile(r"[a-z0-9]{1,16}")
WORK_ID_PATTERN = re.compile(r"([a-z0-9]{1,16})-[0-9a-f]{16}")

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]


class StoreUnavailable(Exception):
    """The write could not be committed (disk error, shutting down, or timed out)."""


@dataclass(frozen=True)
class Claim:
    work_id: str
    iterations: int
    attempt: int
    lease_seconds: float
    payload: bytes


@dataclass(frozen=True)
class Delivered:
    work_id: str
    result: str
    completed_at: float


def owner_of(work_id: str) -> str | None:
    """The node id that owns a work id, or None if it is not a well-formed id."""
    match = WORK_ID_PATTERN.fullmatch(work_id)
    return match.group(1) if match else None


def schema_version(schema_sql: str) -> int:
    match = re.search(r"PRAGMA\s+user_version\s*=\s*(\d+)", schema_sql, re.IGNORECASE)
    if match is None:
        raise ValueError("schema.sql does not set PRAGMA user_version")
    return int(match.group(1))


def open_read_only(path: str | Path) -> sqlite3.Connection:
    """A connection for readers outside the endpoint process (the scaler)."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def read_stats(conn: sqlite3.Connection, node_id: str, worker_seen_window: float = 120.0) -> dict[str, Any]:
    """The figures of GET /stats, all from one snapshot of the file."""
    now = time.time()
    conn.execute("BEGIN")
    try:
        counts = dict(conn.execute("SELECT state, items FROM state_counts").fetchall())
        (oldest,) = conn.execute("SELECT min(created_at) FROM work_items WHERE state = 'pending'").fetchone()
        (undelivered,) = conn.execute(
            "SELECT count(*) FROM work_items WHERE state = 'completed' AND delivered_at IS NULL"
        ).fetchone()
        recent_jobs, recent_duration = conn.execute(
            "SELECT count(*), avg(duration_s) FROM work_items WHERE state = 'completed' AND completed_at > ?",
            (now - RECENT_WINDOW_S,),
        ).fetchone()
        (recent_arrivals,) = conn.execute(RECENT_ARRIVALS_SQL, (now - ARRIVAL_WINDOW_S,)).fetchone()
        (recent_arrivals_pending,) = conn.execute(RECENT_ARRIVALS_PENDING_SQL, (now - ARRIVAL_WINDOW_S,)).fetchone()
        workers = conn.execute(
            "SELECT worker_id, last_seen_at, jobs_completed FROM workers WHERE last_seen_at > ? ORDER BY worker_id",
            (now - worker_seen_window,),
        ).fetchall()
        scaler = conn.execute(
            """SELECT last_run_at, last_decision, consecutive_failures, breaker_open, last_failure_at, last_error
               FROM scaler WHERE node_id = ?""",
            (node_id,),
        ).fetchone()
    finally:
        conn.execute("COMMIT")
    return {
        "node": node_id,
        **{state: counts.get(state, 0) for state in STATES},
        "undelivered": undelivered,
        "oldest_pending_age_s": round(now - oldest, 3) if oldest is not None else 0.0,
        "recent_jobs": recent_jobs,
        "recent_window_s": RECENT_WINDOW_S,
        "recent_job_duration_s": round(recent_duration, 6) if recent_duration is not None else None,
        "recent_arrivals": recent_arrivals,
        "recent_arrivals_pending": recent_arrivals_pending,
        "arrival_window_s": ARRIVAL_WINDOW_S,
        "workers": [
            {"id": worker_id, "last_seen_s_ago": round(now - seen, 3), "jobs_completed": jobs}
            for worker_id, seen, jobs in workers
        ],
        "scaler": _scaler_view(scaler, now),
    }


def _scaler_view(row: tuple | None, now: float) -> dict[str, Any] | None:
    if row is None:
        return None
    last_run_at, last_decision, failures, breaker_open, last_failure_at, last_error = row
    return {
        "last_run_s_ago": round(now - last_run_at, 1) if last_run_at else None,
        "last_decision": last_decision,
        "breaker_open": bool(breaker_open),
        "consecutive_failures": failures,
        "last_error": last_error,
        "last_failure_s_ago": round(now - last_failure_at, 1) if last_failure_at else None,
    }


class _Writer:
    """Runs write operations on one connection, many per transaction.

    A write is durable by default: its caller hears back after an fsync (with synchronous
    FULL). Writes whose loss in a power cut is harmless -- a claim or a lease renewal: the
    item simply becomes pending again and runs again -- may say durable=False; a batch made
    only of those commits without waiting for the disk, and the next durable commit syncs
    them along.

    A caller that gives up waiting cancels its write, which is then skipped: a request that
    was answered "unavailable" did not change the store after all. Only a write already in
    the transaction being committed can still land; its caller is told the outcome is unknown.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], synchronous: str, max_batch: int = 512) -> None:
        self._queue: queue.SimpleQueue[tuple[WriteOp[Any], Future[Any], bool] | None] = queue.SimpleQueue()
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._closed = False
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(connect,), name="sqlite-writer", daemon=True)
        self._thread.start()

    def run(self, op: WriteOp[T], timeout: float = 30.0, durable: bool = True) -> T:
        if self._closed or self._broken:
            raise StoreUnavailable(f"store is {'closed' if self._closed else f'broken: {self._broken}'}")
        future: Future[T] = Future()
        self._queue.put((op, future, durable))
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.cancel():
                raise StoreUnavailable(f"write not started within {timeout:.0f}s; nothing was stored") from None
        try:  # it is in the transaction being committed: its outcome is near
            return future.result(timeout)
        except FutureTimeout:
            raise StoreUnavailable(f"write not committed within {2 * timeout:.0f}s; outcome unknown") from None

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self, connect: Callable[[], sqlite3.Connection]) -> None:
        try:
            conn = connect()
        except sqlite3.Error as exc:
            log.exception("the writer cannot open the database")
            self._broken = exc
            return
        synchronous = self._synchronous
        try:
            while True:
                batch, stop = self._next_batch()
                # Writes whose callers gave up waiting are skipped, not applied behind their backs.
                batch = [item for item in batch if item[1].set_running_or_notify_cancel()]
                if batch:
                    try:
                        wanted = self._synchronous if any(durable for _, _, durable in batch) else "NORMAL"
                        if wanted != synchronous:
                            conn.execute(f"PRAGMA synchronous = {wanted}")
                            synchronous = wanted
                        self._commit(conn, batch)
                    except Exception as exc:  # noqa: BLE001 -- the writer must outlive any one batch
                        log.exception("writing a batch of %d failed", len(batch))
                        for _, future, _ in batch:
                            if not future.done():
                                future.set_exception(StoreUnavailable(f"database write failed: {exc}"))
                if stop:
                    return
        finally:
            conn.close()

    def _next_batch(self) -> tuple[list[tuple[WriteOp[Any], Future[Any], bool]], bool]:
        """The writes waiting now (at least one), and whether close() was asked for."""
        item = self._queue.get()
        if item is None:
            return [], True
        batch = [item]
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[tuple[WriteOp[Any], Future[Any], bool]]) -> None:
        # Each op runs inside its own savepoint so that one op's error undoes only that op.
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except Exception as exc:  # noqa: BLE001 -- handed to the caller below
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((future, None, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((future, value, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.exception("transaction of %d writes failed; none of them is stored", len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future, _ in batch:
                future.set_exception(StoreUnavailable(f"database write failed: {exc}"))
            return
        for future, value, error in outcomes:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


class Store:
    """Work items, leases and results of one endpoint (node)."""

    def __init__(
        self,
        path: str | Path,
        node_id: str,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
        maintenance_interval: float = 1.0,
        worker_seen_window: float = 120.0,
        retention_days: float = 7.0,
    ) -> None:
        if not NODE_ID_PATTERN.fullmatch(node_id):
            raise ValueError(f"node id {node_id!r} must be 1-16 lowercase letters or digits")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        self.path = Path(path)
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.worker_seen_window = worker_seen_window
        self.retention_s = retention_days * 86_400
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._readers = threading.local()
        self._contacts: dict[str, float] = {}
        self._contacts_lock = threading.Lock()

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._apply_schema()
        self._writer = _Writer(self._connect, self._synchronous)
        self._stopping = threading.Event()
        self._maintenance = threading.Thread(
            target=self._maintain, args=(maintenance_interval,), name="store-maintenance", daemon=True
        )
        self._maintenance.start()

    # -- lifecycle ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _apply_schema(self) -> None:
        schema_sql = SCHEMA_PATH.read_text()
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > schema_version(schema_sql):
                raise RuntimeError(f"{self.path} has schema version {found}, newer than this code's")
            conn.executescript(schema_sql)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?)", (self.node_id,))
            (owner,) = conn.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
            if owner != self.node_id:
                raise RuntimeError(f"{self.path} belongs to node {owner!r}, not {self.node_id!r}")
        finally:
            conn.close()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._readers.conn = conn
        return conn

    def close(self) -> None:
        self._stopping.set()
        self._maintenance.join(timeout=10)
        self._flush_contacts()
        self._writer.close()

    def _maintain(self, interval: float) -> None:
        # Leases expire and worker contacts are recorded even when no worker calls in.
        next_prune = 0.0
        while not self._stopping.wait(interval):
            try:
                self._writer.run(lambda conn: self._requeue_expired(conn, time.time()), durable=False)
                self._flush_contacts()
                if self.retention_s and time.monotonic() >= next_prune:
                    pruned = self.prune_delivered()
                    # A full batch means more are due: come back next round, not in a minute.
                    next_prune = time.monotonic() + (0 if pruned == PRUNE_BATCH else 60)
            except Exception:  # noqa: BLE001 -- keep maintaining; the next round retries
                log.exception("store maintenance failed")

    def prune_delivered(self, now: float | None = None) -> int:
        """Delete results delivered more than the retention period ago, a batch at a time (so
        that enqueues never wait behind one big delete). Undelivered results and failed items
        are never pruned."""
        cutoff = (now or time.time()) - self.retention_s

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                """DELETE FROM work_items WHERE seq IN
                   (SELECT seq FROM work_items WHERE delivered_at IS NOT NULL AND delivered_at < ?
                    ORDER BY delivered_at LIMIT ?)""",
                (cutoff, PRUNE_BATCH),
            ).rowcount

        # A lost prune is simply done again: no fsync needed.
        pruned = self._writer.run(op, durable=False)
        if pruned:
            log.info("pruned %d results delivered over %.0f days ago", pruned, self.retention_s / 86_400)
        return pruned

    # -- public API --------------------------------------------------------------------

    def enqueue(self, payload: bytes, iterations: int) -> str:
        work_id = f"{self.node_id}-{secrets.token_hex(8)}"
        created_at = time.time()

        def op(conn: sqlite3.Connection) -> None:
            seq = conn.execute(
                "INSERT INTO work_items (id, iterations, payload_bytes, created_at) VALUES (?, ?, ?, ?)",
                (work_id, iterations, len(payload), created_at),
            ).lastrowid
            conn.execute("INSERT INTO payloads (seq, data) VALUES (?, ?)", (seq, payload))

        self._writer.run(op)
        return work_id

    def take_completed(self, limit: int, delivery_id: str) -> list[Delivered]:
        """Mark up to `limit` undelivered results delivered and return them, newest first.

        Taking again with the same delivery_id returns what that take returned, so a caller
        whose answer got lost can retry without losing or duplicating results.
        """

        def op(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            earlier = conn.execute(
                "SELECT id, result, completed_at FROM work_items WHERE delivery_id = ?", (delivery_id,)
            ).fetchall()
            if earlier:
                return earlier
            return conn.execute(
                """
                UPDATE work_items SET delivered_at = ?, delivery_id = ?
                WHERE seq IN (SELECT seq FROM work_items
                              WHERE state = 'completed' AND delivered_at IS NULL
                              ORDER BY completed_at DESC LIMIT ?)
                RETURNING id, result, completed_at
                """,
                (time.time(), delivery_id, limit),
            ).fetchall()

        rows = self._writer.run(op)
        delivered = [Delivered(work_id, result, completed_at) for work_id, result, completed_at in rows]
        delivered.sort(key=lambda item: item.completed_at, reverse=True)
        return delivered

    def get(self, work_id: str) -> dict[str, Any] | None:
        conn = self._reader()
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute(
                """
                SELECT id, state, iterations, payload_bytes, attempts, worker_id, created_at,
                       claimed_at, lease_expires_at, completed_at, duration_s, result,
                       delivered_at, failed_reason
                FROM work_items WHERE id = ?
                """,
                (work_id,),
            ).fetchone()
        finally:
            conn.row_factory = None
        return dict(row) if row else None

    def stats(self, worker_seen_window: float | None = None) -> dict[str, Any]:
        figures = read_stats(self._reader(), self.node_id, worker_seen_window or self.worker_seen_window)
        with self._contacts_lock:
            contacts = dict(self._contacts)
        # Contacts not yet written by the maintenance thread count as seen too.
        known = {worker["id"]: worker for worker in figures["workers"]}
        now = time.time()
        for worker_id, seen in contacts.items():
            worker = known.setdefault(worker_id, {"id": worker_id, "last_seen_s_ago": None, "jobs_completed": 0})
            ago = round(now - seen, 3)
            if worker["last_seen_s_ago"] is None or ago < worker["last_seen_s_ago"]:
                worker["last_seen_s_ago"] = ago
        figures["workers"] = sorted(known.values(), key=lambda worker: worker["id"])
        return figures

    # -- worker API --------------------------------------------------------------------

    def claim(self, worker_id: str) -> Claim | None:
        """Lease the oldest pending item to `worker_id`, or None when there is none."""
        now = time.time()
        self._record_contact(worker_id, now)
        conn = self._reader()
        # Most polls of an idle queue end here, without a trip through the writer.
        if conn.execute("SELECT 1 FROM work_items WHERE state = 'pending' LIMIT 1").fetchone() is None:
            return None

        def op(conn: sqlite3.Connection) -> Claim | None:
            self._requeue_expired(conn, now)
            rows = conn.execute(
                """
                UPDATE work_items
                SET state = 'running', attempts = attempts + 1, worker_id = ?,
                    claimed_at = ?, lease_expires_at = ?
                WHERE seq = (SELECT seq FROM work_items WHERE state = 'pending'
                             ORDER BY created_at LIMIT 1)
                RETURNING seq, id, iterations, attempts
                """,
                (worker_id, now, now + self.lease_seconds),
            ).fetchall()
            if not rows:
                return None
            seq, work_id, iterations, attempt = rows[0]
            (payload,) = conn.execute("SELECT data FROM payloads WHERE seq = ?", (seq,)).fetchone()
            return Claim(work_id, iterations, attempt, self.lease_seconds, payload)

        return self._writer.run(op, durable=False)

    def renew(self, work_id: str, attempt: int, worker_id: str) -> bool:
        """Extend a lease; False if the lease is no longer this worker's."""
        now = time.time()
        self._record_contact(worker_id, now)

        def op(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    """
                    UPDATE work_items SET lease_expires_at = ?
                    WHERE id = ? AND state = 'running' AND attempts = ? AND worker_id = ?
                    """,
                    (now + self.lease_seconds, work_id, attempt, worker_id),
                ).rowcount
                == 1
            )

        return self._writer.run(op, durable=False)

    def release(self, work_id: str, attempt: int, worker_id: str) -> bool:
        """Give a leased item back at once (the worker is stopping); the attempt is not counted."""
        self._record_contact(worker_id, time.time())

        def op(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    """
                    UPDATE work_items
                    SET state = 'pending', attempts = attempts - 1, lease_expires_at = NULL
                    WHERE id = ? AND state = 'running' AND attempts = ? AND worker_id = ?
                    """,
                    (work_id, attempt, worker_id),
                ).rowcount
                == 1
            )

        return self._writer.run(op, durable=False)

    def complete(self, work_id: str, worker_id: str, result: str, duration_s: float | None) -> bool | None:
        """Store a result. True: stored; False: the item already had one (kept); None: no such item."""
        now = time.time()
        self._record_contact(worker_id, now)

        def op(conn: sqlite3.Connection) -> bool | None:
            rows = conn.execute(
                """
                UPDATE work_items
                SET state = 'completed', result = ?, completed_at = ?, duration_s = ?,
                    worker_id = ?, lease_expires_at = NULL, failed_reason = NULL
                WHERE id = ? AND state <> 'completed'
                RETURNING seq
                """,
                (result, now, duration_s, worker_id, work_id),
            ).fetchall()
            if rows:
                conn.execute("DELETE FROM payloads WHERE seq = ?", (rows[0][0],))
                conn.execute(
                    """
                    INSERT INTO workers (worker_id, first_seen_at, last_seen_at, jobs_completed)
                    VALUES (?, ?, ?, 1)
                    ON CONFLICT (worker_id) DO UPDATE
                    SET last_seen_at = excluded.last_seen_at, jobs_completed = jobs_completed + 1
                    """,
                    (worker_id, now, now),
                )
                return True
            exists = conn.execute("SELECT 1 FROM work_items WHERE id = ?", (work_id,)).fetchone()
            return False if exists else None

        return self._writer.run(op)

    # -- internals ---------------------------------------------------------------------

    def _requeue_expired(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            """
            UPDATE work_items
            SET state = CASE WHEN attempts >= :max_attempts THEN 'failed' ELSE 'pending' END,
                failed_reason = CASE WHEN attempts >= :max_attempts
                    THEN 'lease expired on each of ' || attempts || ' attempts' END,
                lease_expires_at = NULL
            WHERE state = 'running' AND lease_expires_at < :now
            """,
            {"max_attempts": self.max_attempts, "now": now},
        )

    def _record_contact(self, worker_id: str, now: float) -> None:
        # Kept in memory and written every maintenance round: an idle worker polls often,
        # and a write per empty poll would cost an fsync each.
        with self._contacts_lock:
            self._contacts[worker_id] = now

    def _flush_contacts(self) -> None:
        with self._contacts_lock:
            contacts, self._contacts = self._contacts, {}
        if not contacts:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                """
                INSERT INTO workers (worker_id, first_seen_at, last_seen_at) VALUES (?, ?, ?)
                ON CONFLICT (worker_id) DO UPDATE
                SET last_seen_at = max(last_seen_at, excluded.last_seen_at)
                """,
                [(worker_id, seen, seen) for worker_id, seen in contacts.items()],
            )

        self._writer.run(op, durable=False)
