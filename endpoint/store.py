"""One endpoint's work items, kept in its own SQLite file.

A small storage interface: the HTTP layer calls these methods and never writes SQL.

Writes go through the file's single writer (endpoint/writer.py: group commit, bounded
waits, "not stored" told apart from "outcome unknown"). Reads use one connection per
thread and run beside the writer (WAL).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from endpoint.history import History, count_event
from endpoint.key_store import KeyStore
from endpoint.prices import PriceTable
from endpoint.usage import Usage
from endpoint.waiting import WorkSignal, hold_for
from endpoint.writer import (
    DEFAULT_WAIT_S,
    DiskFull,
    OutcomeUnknown,
    StoreUnavailable,
    WriteOp,
    Writer,
    free_bytes,
    is_disk_full,
)

__all__ = ["DiskFull", "OutcomeUnknown", "StoreUnavailable", "Store", "Claim", "ClaimBatch", "ClientDelivery",
           "Delivered", "DeliveryTokenExpired", "Enqueued", "LeaseAnswer", "IdempotencyKeyReused", "WorkerReport",
           "owner_of"]

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
STATES = ("pending", "running", "completed", "failed")
RECENT_WINDOW_S = 600.0  # "recent" jobs in /stats: completed within the last ten minutes
ARRIVAL_WINDOW_S = 60.0  # "recent" arrivals in /stats: short, so that the scaler sees a rising stream early
# Items enqueued since a time (from the created_at index), and how many of them are still pending
# (from the pending index).
RECENT_ARRIVALS_SQL = "SELECT count(*) FROM work_items WHERE created_at > ?"
RECENT_ARRIVALS_PENDING_SQL = "SELECT count(*) FROM work_items WHERE state = 'pending' AND created_at > ?"
# pullCompleted's take and the undelivered count, held to the index of undelivered results: left
# to itself the planner walks work_items_recently_completed, every delivered result ever kept.
# Per client key (NULL with client keys off): `client_key IS ?` matches NULL too, on the index.
UNDELIVERED_SQL = ("SELECT seq FROM work_items INDEXED BY work_items_undelivered_by_client "
                   "WHERE state = 'completed' AND delivered_at IS NULL AND client_key IS ? "
                   "ORDER BY completed_at DESC LIMIT ?")
UNDELIVERED_COUNT_SQL = ("SELECT count(*) FROM work_items INDEXED BY work_items_undelivered "
                         "WHERE state = 'completed' AND delivered_at IS NULL")
PRUNE_BATCH = 1000
REPORTS_KEPT_S = 86_400.0  # what a worker reported of itself is forgotten after a day without word
IDEMPOTENCY_TTL_S = 86_400.0  # an Idempotency-Key is remembered this long after its first use
DELIVERY_TOKEN_TTL_S = 86_400.0  # a client's delivery token of pullCompleted: repeatable this long after first use
CLIENT_DELIVERY_PREFIX = "client:"  # delivery_id of results taken under a client's token (peers send 32 hex)
TAKE_SQL = f"""UPDATE work_items SET delivered_at = ?, delivery_id = ?
               WHERE seq IN ({UNDELIVERED_SQL})
               RETURNING id, result, completed_at"""
TAKEN_BEFORE_SQL = "SELECT id, result, completed_at FROM work_items WHERE delivery_id = ?"
REPLAYS_REMEMBERED = 4096
START_ROOM_BYTES = 1024 * 1024  # an endpoint that cannot open its file with less free than this says the disk is full
REBUILT_AT_VERSION = 3  # files older than this get work_items rebuilt (its CHECK constraints came then)
NODE_ID_PATTERN = re.compile(r"[a-z0-9]{1,16}")
WORK_ID_PATTERN = re.compile(r"([a-z0-9]{1,16})-[0-9a-f]{16}")



class IdempotencyKeyReused(Exception):
    """An Idempotency-Key that was first used for a different request (payload or iterations)."""


class DeliveryTokenExpired(Exception):
    """A client's delivery token first used longer ago than DELIVERY_TOKEN_TTL_S: its answer is no longer kept."""


class LeaseAnswer(enum.Enum):
    """What became of a worker's renew, release or result: done, moved on (why), or no such item."""

    DONE = "done"
    COMPLETED = "completed"  # the item has a result: a renew or release is moot, a result is not stored
    LEASED_ELSEWHERE = "leased_elsewhere"  # another lease (attempt) holds it now
    NOT_LEASED = "not_leased"  # nobody holds it: the lease expired (pending again, or failed)
    NO_SUCH_ITEM = "no_such_item"


@dataclass(frozen=True)
class Enqueued:
    work_id: str
    replayed: bool  # an earlier request with the same Idempotency-Key made it


@dataclass(frozen=True)
class Claim:
    work_id: str
    iterations: int
    attempt: int
    lease_seconds: float
    payload: bytes
    lease_expires_at: float = 0.0  # as written: an undo gives back only this very lease, not a renewed one


@dataclass(frozen=True)
class ClaimBatch:
    claims: list[Claim]
    pending: int  # items still pending after this claim
    waited: bool = True  # False: the claim could not wait (too many waiting), so its worker backs off
    hold: str = ""  # for endpoint/bridge.py: "<generation> <seconds> <worker> <token>" to hold the answer


@dataclass(frozen=True)
class WorkerReport:
    """What a worker says of itself in its claims: its hashing kernel and how many jobs it runs at once."""

    kernel: str
    processes: int
    capacity: int  # processes x lanes


@dataclass(frozen=True)
class Delivered:
    work_id: str
    result: str
    completed_at: float


def _pending_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT items FROM state_counts WHERE state = 'pending'").fetchone()[0]


def _within_bytes(candidates: list[tuple[int, int]], max_bytes: int) -> list[int]:
    """The seqs of the first candidates (seq, payload bytes) whose payloads fit into `max_bytes`
    together (0: no bound); the first one always, however large it is."""
    chosen, total = [], 0
    for seq, size in candidates:
        total += size
        if chosen and max_bytes and total > max_bytes:
            break
        chosen.append(seq)
    return chosen


def _kernel_counts(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Workers per hashing kernel ("unknown": not reported since this endpoint started)."""
    counts: dict[str, int] = {}
    for worker in workers:
        kernel = worker["kernel"] or "unknown"
        counts[kernel] = counts.get(kernel, 0) + 1
    return counts
@dataclass(frozen=True)
class ClientDelivery:
    """What a pull under a client's delivery token holds: this endpoint's part, and the peer's."""

    local: list[Delivered]
    peer_limit: int  # results the peer is (or was) asked for; 0: none
    peer_part: list[Delivered] | None  # None: not settled yet (ask the peer, under the token derived from this one)
    replayed: bool  # the token was used before: this is that pull's answer


def _delivered(rows: list[tuple[str, str, float]]) -> list[Delivered]:
    return [Delivered(work_id, result, completed_at) for work_id, result, completed_at in rows]


def _peer_part(encoded: str | None) -> list[Delivered] | None:
    if encoded is None:
        return None
    return [Delivered(str(work_id), str(result), float(completed_at))
            for work_id, result, completed_at in json.loads(encoded)]


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
        (undelivered,) = conn.execute(UNDELIVERED_COUNT_SQL).fetchone()
        recent_jobs, recent_duration = conn.execute(
            "SELECT count(*), avg(duration_s) FROM work_items WHERE state = 'completed' AND completed_at > ?",
            (now - RECENT_WINDOW_S,),
        ).fetchone()
        (recent_arrivals,) = conn.execute(RECENT_ARRIVALS_SQL, (now - ARRIVAL_WINDOW_S,)).fetchone()
        (recent_arrivals_pending,) = conn.execute(RECENT_ARRIVALS_PENDING_SQL, (now - ARRIVAL_WINDOW_S,)).fetchone()
        workers = conn.execute(
            # The index, not the planner's scan in id order: the table remembers every worker of the history kept.
            "SELECT worker_id, last_seen_at, jobs_completed FROM workers INDEXED BY workers_last_seen "
            "WHERE last_seen_at > ? ORDER BY worker_id",
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


def request_fingerprint(payload: bytes, iterations: int) -> str:
    """What an Idempotency-Key is bound to: the same key must come with the same request."""
    return hashlib.sha256(b"%d\n" % iterations + payload).hexdigest()


def _work_items_definition(schema_sql: str) -> str:
    match = re.search(r"CREATE TABLE IF NOT EXISTS work_items \((.*?)\n\);", schema_sql, re.DOTALL)
    if match is None:
        raise RuntimeError("schema.sql has no CREATE TABLE IF NOT EXISTS work_items (...);")
    return match.group(1)


def _work_items_added_columns_sql(schema_sql: str, old_columns: list[str]) -> str:
    """ALTER TABLE ... ADD COLUMN for the plain (nullable, unconstrained) columns schema.sql has and the file
    lacks; any other new column needs a rebuild (a new REBUILT_AT_VERSION)."""
    statements = []
    for line in _work_items_definition(schema_sql).splitlines():
        column = re.match(r"^    ([a-z_]+)\s+(INTEGER|TEXT|REAL)(.*)$", line)
        if column is None or column.group(1) in old_columns:
            continue
        if not re.fullmatch(r"\s*,\s*(--.*)?", column.group(3)):
            raise RuntimeError(f"work_items column {column.group(1)} cannot be added in place: it needs a rebuild")
        statements.append(f"ALTER TABLE work_items ADD COLUMN {column.group(1)} {column.group(2)};\n")
    return "".join(statements)


def _work_items_rebuild_sql(schema_sql: str, old_columns: list[str]) -> str:
    """Rebuild work_items from schema.sql's definition, keeping every row (SQLite cannot add CHECK
    constraints to a table). Indexes and triggers are dropped with the old table; schema.sql,
    applied right after in the same transaction, creates them again."""
    definition = _work_items_definition(schema_sql)
    new_columns = re.findall(r"^    ([a-z_]+)\s+(?:INTEGER|TEXT|REAL)", definition, re.MULTILINE)
    kept = ", ".join(column for column in new_columns if column in old_columns)
    return (f"CREATE TABLE work_items_rebuilt ({definition}\n);\n"
            f"INSERT INTO work_items_rebuilt ({kept}) SELECT {kept} FROM work_items;\n"
            "DROP TABLE work_items;\n"
            "ALTER TABLE work_items_rebuilt RENAME TO work_items;\n")


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
        write_wait_s: float = DEFAULT_WAIT_S,
        max_waiting_claims: int = 8,
        delivery_token_ttl_s: float = DELIVERY_TOKEN_TTL_S,
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
        self.delivery_token_ttl_s = delivery_token_ttl_s
        # Replays of a delivery id, counted by the writer's ops: a take whose caller heard "outcome
        # unknown" is not undone once a repeat of its token has handed its results out after all.
        self._replays: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []  # every thread's, closed with the store
        self._reader_conns_lock = threading.Lock()
        self._contacts: dict[str, float] = {}
        self._contacts_lock = threading.Lock()
        # When maintenance last checked the leases (and that committed). A longer gap than this pause means
        # the endpoint itself did not run -- SIGSTOP, a paused VM, a writer stuck on its disk -- and so its
        # workers could not renew either: their leases get a grace, as after a restart (_requeue_expired).
        self._leases_checked_at = time.time()
        self._pause_s = max(3 * maintenance_interval, lease_seconds / 3)
        self._reports: dict[str, tuple[float, WorkerReport]] = {}  # in memory: every claim repeats them
        self._work_signal = WorkSignal(max_waiting_claims)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._set_aside_orphaned_wal()
        try:
            self._apply_schema()
        except sqlite3.OperationalError as exc:
            # Opening needs room too (the WAL's index file, the restart's lease grace): say why it failed.
            free = free_bytes(self.path.parent)
            if is_disk_full(exc) or free < START_ROOM_BYTES:
                raise DiskFull(f"cannot open {self.path}: the disk holding it is full ({free} bytes free; {exc}); "
                               "start the endpoint again once there is room") from exc
            raise
        self._writer = Writer(self.path, self._connect, self._synchronous, write_wait_s)
        self.history = History(self._writer, self._reader, node_id, retention_days)
        self.client_keys = KeyStore(self._writer, self._reader)
        self._sample_history()  # at once: the first sample is the baseline of what this run will count
        self._stopping = threading.Event()
        self._maintenance = threading.Thread(
            target=self._maintain, args=(maintenance_interval,), name="store-maintenance", daemon=True
        )
        self._maintenance.start()

    def usage(self, prices: PriceTable) -> Usage:
        """The worker machines' seconds and cost (endpoint/usage.py), kept in this file by its writer."""
        return Usage(self._writer, self._reader, prices)

    # -- lifecycle ---------------------------------------------------------------------

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        # Only the schema's application may create the file: a connection made after the file was
        # deleted must fail, not quietly start an empty database in its place.
        target = self.path if create else f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=rw"
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=not create)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _set_aside_orphaned_wal(self) -> None:
        """A WAL file without its database (the file was deleted under a process that then died)
        would be replayed into the new, empty file: move it out of the way."""
        if self.path.exists():
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for suffix in ("-wal", "-shm"):
            orphan = self.path.with_name(self.path.name + suffix)
            if orphan.exists():
                target = orphan.with_name(f"{orphan.name}.orphaned-{stamp}")
                orphan.rename(target)
                log.warning("%s has no database file beside it: moved it to %s", orphan, target)

    def _apply_schema(self) -> None:
        schema_sql = SCHEMA_PATH.read_text()
        conn = self._connect(create=True)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > schema_version(schema_sql):
                raise RuntimeError(f"{self.path} has schema version {found}, newer than this code's")
            old_columns = [row[1] for row in conn.execute("PRAGMA table_info(work_items)")]
            rebuild = bool(old_columns) and found < REBUILT_AT_VERSION
            # Dropping the old table must not cascade into payloads; checked again below.
            conn.execute("PRAGMA foreign_keys = OFF")
            if rebuild:
                script = _work_items_rebuild_sql(schema_sql, old_columns)
            else:
                script = _work_items_added_columns_sql(schema_sql, old_columns) if old_columns else ""
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{script}{schema_sql}\n{self._grace_sql(time.time())}\nCOMMIT;")
            except sqlite3.IntegrityError as exc:
                raise RuntimeError(f"cannot bring {self.path} to schema version {schema_version(schema_sql)}: "
                                   f"a row breaks the new constraints ({exc}); nothing was changed") from exc
            if rebuild:
                if conn.execute("PRAGMA foreign_key_check").fetchall():
                    raise RuntimeError(f"{self.path}: payloads without their item after the rebuild")
                log.warning("%s: work_items rebuilt for schema version %d (was %d)", self.path,
                            schema_version(schema_sql), found)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?)", (self.node_id,))
            (owner,) = conn.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
            if owner != self.node_id:
                raise RuntimeError(f"{self.path} belongs to node {owner!r}, not {self.node_id!r}")
        finally:
            conn.close()

    def _grace_sql(self, now: float) -> str:
        """Leases held when the endpoint starts (or resumes after a pause): their workers could not renew
        while it was down. Each gets a full lease from now to renew in, and if it expires unrenewed it
        does not count."""
        return (f"UPDATE work_items SET lease_expires_at = max(lease_expires_at, {now + self.lease_seconds!r}),"
                " lease_confirmed = 0 WHERE state = 'running';")

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"cannot open {self.path} to read it: {exc}") from exc
            conn.execute("PRAGMA query_only = ON")
            self._readers.conn = conn
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
        return conn

    def close(self) -> None:
        self._work_signal.close()
        self._stopping.set()
        self._maintenance.join(timeout=10)
        try:
            self._flush_contacts()
        except (StoreUnavailable, OutcomeUnknown) as exc:
            log.warning("worker contacts not recorded at close: %s", exc)
        self._writer.close()
        with self._reader_conns_lock:
            readers, self._reader_conns = self._reader_conns, []
        for conn in readers:
            conn.close()

    def _maintain(self, interval: float) -> None:
        # Leases expire and worker contacts are recorded even when no worker calls in.
        next_prune = 0.0
        def check_leases(conn: sqlite3.Connection) -> tuple[float, int]:
            now = time.time()
            return now, self._requeue_expired(conn, now)

        while not self._stopping.wait(interval):
            try:
                self._leases_checked_at, requeued = self._writer.run(check_leases, durable=False)
                if requeued:
                    self._work_signal.notify(requeued)
                self._pass_on_spent_wakes()
                self._flush_contacts()
                self._sample_history()
                if time.monotonic() >= next_prune:
                    pruned = (self.prune_idempotency_keys() + self.prune_client_deliveries() + self.history.prune()
                              + self.prune_workers() + (self.prune_delivered() if self.retention_s else 0))
                    # A full batch means more are due: come back next round, not in a minute.
                    next_prune = time.monotonic() + (0 if pruned >= PRUNE_BATCH else 60)
            except DiskFull:
                log.debug("store maintenance waits for disk space")  # the writer says so in the log
            except Exception:  # noqa: BLE001 -- keep maintaining; the next round retries
                log.exception("store maintenance failed")

    def _sample_history(self) -> None:
        try:
            self.history.sample_if_due(self.stats)
        except (StoreUnavailable, OutcomeUnknown) as exc:  # a gap in the charts; the next minute tries again
            log.debug("no sample this minute: %s", exc)

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

    def prune_idempotency_keys(self, now: float | None = None) -> int:
        return self._prune_created_before("idempotency_keys", "key", (now or time.time()) - IDEMPOTENCY_TTL_S)

    def prune_client_deliveries(self, now: float | None = None) -> int:
        """Forget delivery tokens first used longer ago than their lifetime; their results stay delivered."""
        cutoff = (now or time.time()) - self.delivery_token_ttl_s
        return self._prune_created_before("client_deliveries", "token", cutoff)

    def _prune_created_before(self, table: str, key: str, cutoff: float, column: str = "created_at") -> int:
        """Delete at most PRUNE_BATCH of `table`'s oldest rows whose `column` is before `cutoff` (the
        table and its columns are this module's constants, never input)."""
        statement = (f"DELETE FROM {table} WHERE {key} IN "
                     f"(SELECT {key} FROM {table} WHERE {column} < ? ORDER BY {column} LIMIT ?)")

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(statement, (cutoff, PRUNE_BATCH)).rowcount

        return self._writer.run(op, durable=False)

    def prune_workers(self, now: float | None = None) -> int:
        """Forget workers not heard from for the history's retention period: a fleet replaced every day
        leaves a thousand ids a day, which /stats would otherwise scan on every call."""
        return self._prune_created_before("workers", "worker_id", (now or time.time()) - self.history.keep_s,
                                          column="last_seen_at")

    # -- public API --------------------------------------------------------------------

    def enqueue(self, payload: bytes, iterations: int, idempotency_key: str | None = None,
                client: str | None = None) -> Enqueued:
        """Store a new item, of the client key `client` (its id) if given. With an idempotency key seen in
        the last day for the same payload and iterations (and client key), return that request's item instead
        (IdempotencyKeyReused if they differ)."""
        work_id = f"{self.node_id}-{secrets.token_hex(8)}"
        if idempotency_key is not None and client is not None:
            idempotency_key = f"{client}:{idempotency_key}"  # each key's own: ids are 16 hex digits
        fingerprint = request_fingerprint(payload, iterations) if idempotency_key is not None else ""

        def op(conn: sqlite3.Connection) -> Enqueued:
            now = time.time()
            if idempotency_key is not None:
                earlier = conn.execute(
                    "SELECT work_id, fingerprint FROM idempotency_keys WHERE key = ? AND created_at >= ?",
                    (idempotency_key, now - IDEMPOTENCY_TTL_S),
                ).fetchone()
                if earlier is not None:
                    if earlier[1] != fingerprint:
                        raise IdempotencyKeyReused(earlier[0])
                    return Enqueued(earlier[0], replayed=True)
                conn.execute(
                    """INSERT OR REPLACE INTO idempotency_keys (key, work_id, fingerprint, created_at)
                       VALUES (?, ?, ?, ?)""",
                    (idempotency_key, work_id, fingerprint, now),
                )
            seq = conn.execute(
                "INSERT INTO work_items (id, iterations, payload_bytes, created_at, client_key) VALUES (?, ?, ?, ?, ?)",
                (work_id, iterations, len(payload), now, client),
            ).lastrowid
            conn.execute("INSERT INTO payloads (seq, data) VALUES (?, ?)", (seq, payload))
            return Enqueued(work_id, replayed=False)

        def undo(enqueued: Enqueued) -> WriteOp[Any] | None:
            # With a key, the client's retry finds the item: keep it. Without one, a retry would make
            # a second item, and a client that does not retry never learnt this one's id.
            if idempotency_key is not None or enqueued.replayed:
                return None
            return lambda conn: conn.execute("DELETE FROM work_items WHERE id = ? AND state = 'pending'",
                                             (enqueued.work_id,))

        enqueued = self._writer.run(op, undo=undo)
        if not enqueued.replayed:
            self._work_signal.notify(1)
        return enqueued

    def take_completed(self, limit: int, delivery_id: str, client: str | None = None) -> list[Delivered]:
        """Mark up to `limit` undelivered results delivered and return them, newest first: of the items that
        client key enqueued (`client`, its id), or with client keys off (None) of the items enqueued without.

        Taking again with the same delivery_id returns what that take returned, so a caller
        whose answer got lost can retry without losing or duplicating results. A take whose
        caller heard "outcome unknown" is undone when it commits (its results go out again),
        unless a repeat of its delivery_id has returned them meanwhile.
        """

        def op(conn: sqlite3.Connection) -> tuple[list[tuple[str, str, float]], int]:
            earlier = conn.execute(TAKEN_BEFORE_SQL, (delivery_id,)).fetchall()
            if earlier:
                return earlier, self._note_replay(delivery_id)
            taken = conn.execute(TAKE_SQL, (time.time(), delivery_id, client, limit)).fetchall()
            count_event(conn, "delivered", len(taken))
            return taken, self._replays_of(delivery_id)

        def undo(taken: tuple[list[tuple[str, str, float]], int]) -> WriteOp[Any] | None:
            rows, replays = taken
            return self._give_back_op(delivery_id, replays) if rows else None

        rows, _ = self._writer.run(op, undo=undo)
        return sorted(_delivered(rows), key=lambda item: item.completed_at, reverse=True)

    def take_for_client(self, token: str, limit: int, fill_up: bool, client: str | None = None) -> ClientDelivery:
        """pullCompleted under a client's delivery token: the first use takes up to `limit` results
        (and, with `fill_up`, leaves room for the peer's part); a repeat returns what the first took,
        whatever its limit. DeliveryTokenExpired for a token used longer ago than its lifetime.

        A first take whose caller heard "outcome unknown" is undone when it commits, record and all,
        unless a repeat of the token has been answered from it meanwhile."""
        delivery_id = CLIENT_DELIVERY_PREFIX + token

        def op(conn: sqlite3.Connection) -> tuple[ClientDelivery, int]:
            now = time.time()
            record = conn.execute("SELECT created_at, peer_limit, peer_part FROM client_deliveries WHERE token = ?",
                                  (token,)).fetchone()
            if record is not None:
                created_at, peer_limit, peer_part = record
                if created_at < now - self.delivery_token_ttl_s:
                    raise DeliveryTokenExpired(token)
                local = _delivered(conn.execute(TAKEN_BEFORE_SQL, (delivery_id,)).fetchall())
                return (ClientDelivery(local, peer_limit, _peer_part(peer_part), replayed=True),
                        self._note_replay(delivery_id))
            # Its record was pruned, but its results are still here: an old token, not a new one.
            if conn.execute("SELECT 1 FROM work_items WHERE delivery_id = ? LIMIT 1", (delivery_id,)).fetchone():
                raise DeliveryTokenExpired(token)
            local = _delivered(conn.execute(TAKE_SQL, (now, delivery_id, client, limit)).fetchall())
            count_event(conn, "delivered", len(local))
            peer_limit = limit - len(local) if fill_up else 0
            conn.execute("INSERT INTO client_deliveries (token, created_at, peer_limit, peer_part) VALUES (?, ?, ?, ?)",
                         (token, now, peer_limit, None if peer_limit else "[]"))
            return ClientDelivery(local, peer_limit, None if peer_limit else [], replayed=False), \
                self._replays_of(delivery_id)

        def undo(taken: tuple[ClientDelivery, int]) -> WriteOp[Any] | None:
            delivery, replays = taken
            return None if delivery.replayed else self._give_back_op(delivery_id, replays, forget_token=token)

        delivery, _ = self._writer.run(op, undo=undo)
        return delivery

    def settle_peer_part(self, token: str, items: list[Delivered]) -> list[Delivered]:
        """Record the peer's part of a client's delivery (once); returns the part recorded."""
        encoded = json.dumps([[item.work_id, item.result, item.completed_at] for item in items])

        def op(conn: sqlite3.Connection) -> list[Delivered]:
            conn.execute("UPDATE client_deliveries SET peer_part = ? WHERE token = ? AND peer_part IS NULL",
                         (encoded, token))
            row = conn.execute("SELECT peer_part FROM client_deliveries WHERE token = ?", (token,)).fetchone()
            return (_peer_part(row[0]) or []) if row else items

        return self._writer.run(op)

    def give_back(self, delivery_id: str) -> int:
        """Make the results taken under `delivery_id` undelivered again (their taker never got them)."""
        return self._writer.run(self._give_back_op(delivery_id, None))

    def _give_back_op(self, delivery_id: str, replays: int | None, forget_token: str | None = None) -> WriteOp[int]:
        """Undeliver what `delivery_id` took (and forget the client's token); with `replays`, only if
        that take has not been repeated since."""

        def op(conn: sqlite3.Connection) -> int:
            if replays is not None and self._replays_of(delivery_id) != replays:
                log.warning("a take whose caller heard 'outcome unknown' was repeated meanwhile: kept")
                return 0
            if forget_token is not None:
                conn.execute("DELETE FROM client_deliveries WHERE token = ?", (forget_token,))
            given_back = conn.execute("UPDATE work_items SET delivered_at = NULL, delivery_id = NULL "
                                      "WHERE delivery_id = ?", (delivery_id,)).rowcount
            count_event(conn, "given_back", given_back)
            return given_back

        return op

    def _note_replay(self, delivery_id: str) -> int:
        """Count a repeat of a take (called in the writer's thread only, as are the undo ops that read it)."""
        count = self._replays.pop(delivery_id, 0) + 1
        self._replays[delivery_id] = count
        while len(self._replays) > REPLAYS_REMEMBERED:
            self._replays.popitem(last=False)
        return count

    def _replays_of(self, delivery_id: str) -> int:
        return self._replays.get(delivery_id, 0)

    def get(self, work_id: str) -> dict[str, Any] | None:
        conn = self._reader()
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute(
                """
                SELECT id, state, iterations, payload_bytes, attempts, worker_id, created_at,
                       claimed_at, lease_expires_at, completed_at, duration_s, result,
                       delivered_at, failed_reason, client_key
                FROM work_items WHERE id = ?
                """,
                (work_id,),
            ).fetchone()
        finally:
            conn.row_factory = None
        return dict(row) if row else None

    def failed_items(self, limit: int) -> list[dict[str, Any]]:
        """The latest failed items (from their own index), newest first."""
        rows = self._reader().execute(
            "SELECT id, attempts, failed_reason, created_at, worker_id FROM work_items INDEXED BY work_items_failed "
            "WHERE state = 'failed' ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("id", "attempts", "failed_reason", "created_at", "worker_id"), row, strict=True))
                for row in rows]

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
        with self._contacts_lock:
            reports = dict(self._reports)
        for worker_id, worker in known.items():
            _, report = reports.get(worker_id, (0.0, None))
            worker["kernel"] = report.kernel if report else None
            worker["processes"] = report.processes if report else None
            worker["capacity"] = report.capacity if report else None
        figures["workers"] = sorted(known.values(), key=lambda worker: worker["id"])
        figures["kernels"] = _kernel_counts(figures["workers"])
        figures["capacity_reported"] = sum(worker["capacity"] or 0 for worker in figures["workers"])
        figures["waiting_claims"] = self._work_signal.waiters
        figures["disk_full"] = self._writer.disk_full
        return figures

    # -- worker API --------------------------------------------------------------------

    def claim_batch(self, worker_id: str, claim_token: str | None = None, max_jobs: int = 1,
                    max_bytes: int = 0, wait_s: float = 0.0, report: WorkerReport | None = None) -> ClaimBatch:
        """Lease up to `max_jobs` of the oldest pending items to `worker_id` (their payloads at most
        `max_bytes` together, 0: no bound; always one, however large). When there is none, the
        claim waits up to `wait_s` seconds for work to arrive and then answers with nothing, and
        its worker claims again (see endpoint/waiting.py).

        With other claims waiting, one claim takes only its share of what is pending, so a worker
        with many free lanes does not take a shallow queue that idle workers would start as soon.
        A worker names each claim with a token and repeats it when it got no answer: if that
        claim was made, the repeat gets the same leases back (with a fresh lease time) instead of
        leaving them to expire. Each lease runs from when the claim is written. A claim whose
        caller heard "outcome unknown" is given back when it commits, without using attempts.
        """
        self._record_contact(worker_id, time.time(), report)
        self._work_signal.claiming(worker_id)
        generation = self._work_signal.generation  # before looking: work that comes after wakes the wait
        batch = self._claim_now(worker_id, claim_token, max_jobs, max_bytes)
        if batch.claims or wait_s <= 0 or self._work_signal.is_cancelled(worker_id, claim_token):
            return batch
        if not self._work_signal.admit():
            return ClaimBatch([], batch.pending, waited=False)
        # Answered (empty) once work arrives or the wait is over, by the request reader, which holds
        # the answer on its event loop (endpoint/bridge.py). Woken, the claim takes nothing itself:
        # its worker claims again at once, so a claim whose worker died while it waited (nobody
        # would hear its answer) never holds a lease.
        return ClaimBatch([], batch.pending, hold=f"{generation} {wait_s:g} {hold_for(worker_id, claim_token)}")

    def _pass_on_spent_wakes(self) -> None:
        """Wakes whose workers did not come back (full by now, or gone) go to other waiting claims, while
        work is pending: work on a fleet with free lanes does not wait for the next enqueue or for a
        claim's wait to end."""
        late = self._work_signal.overdue()
        if late:
            pending = _pending_count(self._reader())
            if pending:
                self._work_signal.notify(min(late, pending))

    @property
    def work_signal(self) -> WorkSignal:
        """What claims wait for: the request reader holds their answers until it moves."""
        return self._work_signal

    def _claim_now(self, worker_id: str, claim_token: str | None, max_jobs: int, max_bytes: int) -> ClaimBatch:
        conn = self._reader()
        # Most claims of an idle queue end here, without a trip through the writer.
        if conn.execute("SELECT 1 FROM work_items WHERE state = 'pending' LIMIT 1").fetchone() is None and (
                claim_token is None or conn.execute(
                    "SELECT 1 FROM work_items INDEXED BY work_items_leased WHERE state = 'running' AND claim_token = ?"
                    " LIMIT 1", (claim_token,)).fetchone() is None):
            return ClaimBatch([], 0)
        # The workers waiting meanwhile (or just woken, claiming again) get their share of what is pending.
        others = self._work_signal.sharers(worker_id)

        def op(conn: sqlite3.Connection) -> ClaimBatch:
            if self._work_signal.is_cancelled(worker_id, claim_token):
                return ClaimBatch([], _pending_count(conn))
            now = time.time()
            earlier = self._claimed_before(conn, worker_id, claim_token, now) if claim_token else []
            if earlier:
                return ClaimBatch(earlier, _pending_count(conn))
            self._requeue_expired(conn, now)
            pending = _pending_count(conn)
            share = min(max_jobs, max(1, -(-pending // (others + 1))))
            candidates = conn.execute(
                """SELECT seq, payload_bytes FROM work_items INDEXED BY work_items_pending WHERE state = 'pending'
                   ORDER BY created_at LIMIT ?""", (share,)).fetchall()
            chosen = _within_bytes(candidates, max_bytes)
            if not chosen:
                return ClaimBatch([], pending)
            rows = conn.execute(
                f"""
                UPDATE work_items
                SET state = 'running', attempts = attempts + 1, worker_id = ?, claimed_at = ?,
                    lease_expires_at = ?, lease_confirmed = 1, claim_token = ?
                WHERE seq IN ({','.join('?' * len(chosen))}) AND state = 'pending'
                RETURNING seq, id, iterations, attempts, lease_expires_at
                """,
                (worker_id, now, now + self.lease_seconds, claim_token, *chosen),
            ).fetchall()
            rows.sort(key=lambda row: chosen.index(row[0]))  # oldest first, as chosen
            return ClaimBatch([self._claim_of(conn, row) for row in rows], pending - len(rows))

        def undo(batch: ClaimBatch) -> WriteOp[Any] | None:
            if not batch.claims:
                return None

            # Not a lease renewed or handed out again meanwhile (the worker has it after all).
            def give_back(conn: sqlite3.Connection) -> None:
                for claim in batch.claims:
                    self._release(conn, claim.work_id, claim.attempt, worker_id, claim.lease_expires_at)
                self._work_signal.notify(len(batch.claims))

            return give_back

        return self._writer.run(op, durable=False, undo=undo)

    def claim(self, worker_id: str, claim_token: str | None = None) -> Claim | None:
        """The oldest pending item leased to `worker_id`, or None (claim_batch of one, no waiting)."""
        claims = self.claim_batch(worker_id, claim_token).claims
        return claims[0] if claims else None

    def cancel_claim(self, worker_id: str, claim_token: str) -> int:
        """A worker's claim named `claim_token` is off: if it waits, it ends without taking anything;
        what it took is given back, the attempts not counted. Returns the items given back."""
        self._record_contact(worker_id, time.time())
        self._work_signal.cancel(worker_id, claim_token)

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                """UPDATE work_items SET state = 'pending', attempts = attempts - 1, lease_expires_at = NULL
                   WHERE seq IN (SELECT seq FROM work_items INDEXED BY work_items_leased
                                 WHERE state = 'running' AND claim_token = ? AND worker_id = ?)""",
                (claim_token, worker_id)).rowcount

        released = self._writer.run(op, durable=False)
        if released:
            self._work_signal.notify(released)
        return released

    def _claimed_before(self, conn: sqlite3.Connection, worker_id: str, claim_token: str, now: float) -> list[Claim]:
        rows = conn.execute(
            """
            UPDATE work_items SET lease_expires_at = ?, lease_confirmed = 1
            WHERE seq IN (SELECT seq FROM work_items INDEXED BY work_items_leased
                          WHERE state = 'running' AND claim_token = ? AND worker_id = ?)
            RETURNING seq, id, iterations, attempts, lease_expires_at
            """,
            (now + self.lease_seconds, claim_token, worker_id),
        ).fetchall()
        rows.sort()  # by seq: the order in which they were enqueued
        return [self._claim_of(conn, row) for row in rows]

    def _claim_of(self, conn: sqlite3.Connection, row: tuple[int, str, int, int, float]) -> Claim:
        seq, work_id, iterations, attempt, expires = row
        (payload,) = conn.execute("SELECT data FROM payloads WHERE seq = ?", (seq,)).fetchone()
        return Claim(work_id, iterations, attempt, self.lease_seconds, payload, expires)

    def renew_batch(self, worker_id: str, leases: list[tuple[str, int]]) -> list[LeaseAnswer]:
        """Extend each lease (work id, attempt) from now, the time of the write; otherwise say why
        that lease is not this worker's. One answer per lease, in order."""
        self._record_contact(worker_id, time.time())

        def op(conn: sqlite3.Connection) -> list[LeaseAnswer]:
            expires = time.time() + self.lease_seconds
            answers = []
            for work_id, attempt in leases:
                renewed = conn.execute(
                    """UPDATE work_items SET lease_expires_at = ?, lease_confirmed = 1
                       WHERE id = ? AND state = 'running' AND attempts = ? AND worker_id = ?""",
                    (expires, work_id, attempt, worker_id)).rowcount
                answers.append(LeaseAnswer.DONE if renewed else self._why_not_held(conn, work_id))
            return answers

        return self._writer.run(op, durable=False)

    def renew(self, work_id: str, attempt: int, worker_id: str) -> LeaseAnswer:
        return self.renew_batch(worker_id, [(work_id, attempt)])[0]

    def release_batch(self, worker_id: str, leases: list[tuple[str, int]]) -> list[LeaseAnswer]:
        """Give leased items back at once (the worker is stopping); their attempts are not counted."""
        self._record_contact(worker_id, time.time())

        def op(conn: sqlite3.Connection) -> list[LeaseAnswer]:
            return [LeaseAnswer.DONE if self._release(conn, work_id, attempt, worker_id)
                    else self._why_not_held(conn, work_id) for work_id, attempt in leases]

        answers = self._writer.run(op, durable=False)
        if LeaseAnswer.DONE in answers:
            self._work_signal.notify(answers.count(LeaseAnswer.DONE))
        return answers

    def release(self, work_id: str, attempt: int, worker_id: str) -> LeaseAnswer:
        return self.release_batch(worker_id, [(work_id, attempt)])[0]

    def complete_batch(self, worker_id: str, results: list[tuple[str, str, float | None]]) -> list[LeaseAnswer]:
        """Store results (work id, result, duration): for each DONE, COMPLETED if the item already
        had one (kept: the first result stored wins), or NO_SUCH_ITEM. Whatever became of the lease:
        a late result still counts, the work is deterministic. One transaction, one fsync."""
        self._record_contact(worker_id, time.time())

        def op(conn: sqlite3.Connection) -> list[LeaseAnswer]:
            now = time.time()
            answers = []
            for work_id, result, duration_s in results:
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
                if not rows:
                    answers.append(self._why_not_held(conn, work_id))
                    continue
                conn.execute("DELETE FROM payloads WHERE seq = ?", (rows[0][0],))
                answers.append(LeaseAnswer.DONE)
            stored = answers.count(LeaseAnswer.DONE)
            if stored:
                conn.execute(
                    """
                    INSERT INTO workers (worker_id, first_seen_at, last_seen_at, jobs_completed)
                    VALUES (?, ?, ?, ?)
                    ON CONFLICT (worker_id) DO UPDATE
                    SET last_seen_at = excluded.last_seen_at, jobs_completed = jobs_completed + excluded.jobs_completed
                    """,
                    (worker_id, now, now, stored),
                )
            return answers

        return self._writer.run(op)

    def complete(self, work_id: str, worker_id: str, result: str, duration_s: float | None) -> LeaseAnswer:
        return self.complete_batch(worker_id, [(work_id, result, duration_s)])[0]

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _release(conn: sqlite3.Connection, work_id: str, attempt: int, worker_id: str,
                 lease_expires_at: float | None = None) -> bool:
        return conn.execute(
            """
            UPDATE work_items SET state = 'pending', attempts = attempts - 1, lease_expires_at = NULL
            WHERE id = ? AND state = 'running' AND attempts = ? AND worker_id = ?
                  AND (? IS NULL OR lease_expires_at = ?)
            """,
            (work_id, attempt, worker_id, lease_expires_at, lease_expires_at),
        ).rowcount == 1

    @staticmethod
    def _why_not_held(conn: sqlite3.Connection, work_id: str) -> LeaseAnswer:
        row = conn.execute("SELECT state FROM work_items WHERE id = ?", (work_id,)).fetchone()
        if row is None:
            return LeaseAnswer.NO_SUCH_ITEM
        return {"completed": LeaseAnswer.COMPLETED, "running": LeaseAnswer.LEASED_ELSEWHERE}.get(
            row[0], LeaseAnswer.NOT_LEASED)

    def _requeue_expired(self, conn: sqlite3.Connection, now: float) -> int:
        paused_s = now - self._leases_checked_at
        if paused_s > self._pause_s:
            # The endpoint has not run for a while (see __init__): expiring leases now would take the jobs of
            # workers that could not reach it. Until maintenance checks again, each check repeats this.
            log.warning("leases not checked for %.1f s (the endpoint was paused or its writer stuck): every "
                        "running lease gets %g s from now, as after a restart", paused_s, self.lease_seconds)
            conn.execute(self._grace_sql(now))
            return 0
        # A lease carried over a restart (or a pause) and never renewed since (lease_confirmed = 0) is given
        # back without counting: its worker may have given up while the endpoint was down.
        return conn.execute(
            """
            UPDATE work_items
            SET state = CASE WHEN lease_confirmed = 1 AND attempts >= :max_attempts THEN 'failed' ELSE 'pending' END,
                failed_reason = CASE WHEN lease_confirmed = 1 AND attempts >= :max_attempts
                    THEN 'lease expired on each of ' || attempts || ' attempts' END,
                attempts = attempts - (lease_confirmed = 0),
                lease_expires_at = NULL, lease_confirmed = 1
            WHERE state = 'running' AND lease_expires_at < :now
            """,
            {"max_attempts": self.max_attempts, "now": now},
        ).rowcount

    def _record_contact(self, worker_id: str, now: float, report: WorkerReport | None = None) -> None:
        # Kept in memory and written every maintenance round: an idle worker polls often,
        # and a write per empty poll would cost an fsync each.
        with self._contacts_lock:
            self._contacts[worker_id] = now
            if report is not None:
                self._reports[worker_id] = (now, report)

    def _flush_contacts(self) -> None:
        with self._contacts_lock:
            contacts, self._contacts = self._contacts, {}
            forgotten = time.time() - REPORTS_KEPT_S
            self._reports = {worker: seen for worker, seen in self._reports.items() if seen[0] > forgotten}
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

        try:
            self._writer.run(op, durable=False)
        except (StoreUnavailable, OutcomeUnknown):
            # Not written (a full disk, say), or maybe not: keep them, or /stats would soon call live workers silent
            # and the scaler terminate them.
            with self._contacts_lock:
                for worker_id, seen in contacts.items():
                    self._contacts[worker_id] = max(seen, self._contacts.get(worker_id, seen))
            raise
