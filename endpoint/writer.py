"""The single writer of one SQLite file: group commit, bounded waits, and a guard on the file.

Every write of the endpoint goes through one thread that folds the writes waiting at that
moment into one transaction. A caller hears back only after the commit -- with
``synchronous=FULL`` that means on disk -- yet one fsync acknowledges many writes. One
writer also means no SQLITE_BUSY between the endpoint's own threads.

A caller waits at most ``wait_s`` (5 s by default: shorter than the worker's 10 s HTTP
timeout and than the usual client timeouts, so an answer always arrives before its caller
gives up). The caller then hears one of three things:

* the value: the write is committed;
* StoreUnavailable: the write was not applied and never will be. A write whose caller's
  wait ran out before the writer reached it is skipped, not applied behind its back;
* OutcomeUnknown: the write had started and its transaction had not committed in time. It
  may yet commit. Its ``undo``, if it has one, is then run as a write of its own, so that
  a claim nobody received or a take nobody was answered is given back.

A full disk is told apart: SQLite answers SQLITE_FULL and rolls the whole transaction back
(in WAL mode the commit frame is the last one written, so a commit that failed so never
happened), so its writes hear DiskFull, a kind of StoreUnavailable: not stored, retry later.
Nothing has to be done to recover: the next transaction simply tries again, and succeeds
once there is room. The writer says in the log that the disk is full and that space is
back at most once a minute each, rather than once per write (the log may well be on the
same full disk).

Before each transaction the writer checks that the file it writes is still the one at the
file's path (same device and inode). A data file that was deleted or replaced stops every
write with StoreUnavailable and an error in the log, rather than acknowledging writes into
a file that will be lost; what the old file held is copied next to it first.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]
Undo = Callable[[T], "WriteOp[Any] | None"]
DEFAULT_WAIT_S = 5.0
DISK_FULL_LOG_INTERVAL_S = 60.0


class StoreUnavailable(Exception):
    """The write was not applied, and will not be: retrying is safe."""


class DiskFull(StoreUnavailable):
    """The write was not applied because the disk holding the data file is full (SQLITE_FULL)."""


class OutcomeUnknown(Exception):
    """The write was being committed when its caller's wait ran out: it may or may not be stored."""


@dataclass(eq=False)
class _Write(Generic[T]):
    op: WriteOp[T]
    durable: bool
    deadline: float  # time.monotonic() after which the caller no longer waits
    undo: Undo[T] | None = None
    future: Future[T] = field(default_factory=Future)


class FileLost(Exception):
    """The data file at the path is not the file this writer has open."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether SQLite failed for want of disk space (SQLITE_FULL, with any extended code)."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of `directory`."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def file_identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


class Writer:
    """Runs write operations on one connection, many per transaction.

    A write is durable by default: its caller hears back after an fsync (with synchronous
    FULL). Writes whose loss in a power cut is harmless -- a claim or a lease renewal: the
    item simply becomes pending again and runs again -- may say durable=False; a batch made
    only of those commits without waiting for the disk, and the next durable commit syncs
    them along.
    """

    def __init__(self, path: Path, connect: Callable[[], sqlite3.Connection], synchronous: str,
                 wait_s: float = DEFAULT_WAIT_S, max_batch: int = 512) -> None:
        self._path = path
        self._connect = connect
        self._queue: queue.SimpleQueue[_Write[Any] | None] = queue.SimpleQueue()
        self._synchronous = synchronous
        self._wait_s = wait_s
        self._max_batch = max_batch
        self._closed = False
        self._lost: str | None = None  # why the data file can no longer be written: final
        self._conn: sqlite3.Connection | None = None
        self._conn_synchronous = ""
        self._identity: tuple[int, int] | None = None
        self._disk_full_since: float | None = None  # monotonic time of the first SQLITE_FULL in a row
        self._said_full_at = self._said_back_at = -DISK_FULL_LOG_INTERVAL_S
        self._refused_since_said = 0
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._started.wait(30)

    def run(self, op: WriteOp[T], *, durable: bool = True, undo: Undo[T] | None = None,
            wait_s: float | None = None) -> T:
        """Apply `op` in the next transaction and return its value once that is committed.

        `undo` makes the op's effect go away again; it is run if the caller was told the outcome
        is unknown and the op turns out to be stored. It must be safe to run twice."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._lost:
            raise StoreUnavailable(self._lost)
        wait = self._wait_s if wait_s is None else wait_s
        write: _Write[T] = _Write(op, durable, time.monotonic() + wait, undo)
        self._queue.put(write)
        try:
            return write.future.result(wait)
        except (FutureTimeout, CancelledError):
            pass
        if write.future.cancel() or write.future.cancelled():  # not started: the writer will skip it
            raise StoreUnavailable(f"the write did not start within {wait:g}s; nothing was stored") from None
        if write.future.done():  # committed (or failed) a moment after the wait ran out
            return write.future.result()
        if undo is not None:
            write.future.add_done_callback(lambda future: self._undo_if_stored(future, undo))
        raise OutcomeUnknown(f"the write did not commit within {wait:g}s; it may still be stored"
                             + (" (and is then undone)" if undo is not None else ""))

    @property
    def disk_full(self) -> bool:
        """Whether the last transaction failed for want of disk space (and none has committed since)."""
        return self._disk_full_since is not None

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the writer thread ----------------------------------------------------------------

    def _undo_if_stored(self, future: Future[T], undo: Undo[T]) -> None:
        """A write whose caller was told "outcome unknown" has finished: if it was stored, undo it."""
        if not future.cancelled() and future.exception() is None:
            self._queue_undo(undo, future.result())

    def _queue_undo(self, undo: Undo[T], value: T) -> None:
        op = undo(value)
        if op is None:
            return
        write: _Write[Any] = _Write(op, True, time.monotonic() + 3600)
        write.future.add_done_callback(self._log_undo)
        self._queue.put(write)  # runs in the next batch; nobody waits for it

    @staticmethod
    def _log_undo(future: Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            log.error("undoing a write whose caller was told 'outcome unknown' failed: %s",
                      "cancelled" if future.cancelled() else future.exception())
        else:
            log.warning("undid a write whose caller was told 'outcome unknown'")

    def _run(self) -> None:
        try:
            try:
                self._connection()  # now: the file to guard is the one the store set up
            except FileLost as exc:
                self._lose_file(str(exc))
            self._started.set()
            while True:
                batch, stop = self._next_batch()
                if batch:
                    try:
                        self._write(batch)
                    except Exception as exc:  # noqa: BLE001 -- the writer must outlive any one batch
                        log.exception("writing a batch of %d failed", len(batch))
                        self._fail(batch, StoreUnavailable(f"database write failed: {exc}"))
                if stop:
                    return
        finally:
            self._started.set()
            self._drop_connection()

    def _next_batch(self) -> tuple[list[_Write[Any]], bool]:
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

    def _write(self, batch: list[_Write[Any]]) -> None:
        # Writes whose callers already gave up are skipped here, before any lock is taken.
        batch = [write for write in batch if not write.future.cancelled()]
        if not batch:
            return
        try:
            conn = None if self._lost else self._connection()
            if conn is not None:
                self._check_file()
        except FileLost as exc:
            self._lose_file(str(exc))
            conn = None
        if conn is None:
            self._fail(batch, StoreUnavailable(self._lost or "the database cannot be opened; see the endpoint's log"))
            return
        wanted = self._synchronous if any(write.durable for write in batch) else "NORMAL"
        if wanted != self._conn_synchronous:
            conn.execute(f"PRAGMA synchronous = {wanted}")
            self._conn_synchronous = wanted
        self._commit(conn, batch)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write[Any]]) -> None:
        # Each op runs inside its own savepoint so that one op's error undoes only that op.
        outcomes: list[tuple[_Write[Any], Any, BaseException | None]] = []
        committing = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            for write in batch:
                # The caller's wait may have run out while BEGIN waited for the lock or earlier
                # ops ran: such a write is skipped. Once running, it can no longer be cancelled.
                if time.monotonic() > write.deadline:
                    write.future.cancel()
                if write.future.set_running_or_notify_cancel():
                    outcomes.append((write, *self._apply(conn, write)))
            committing = True
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._roll_back(conn)
            if is_disk_full(exc):  # rolled back by SQLite, at COMMIT too: none of them is stored
                self._note_disk_full(len(batch), exc)
                self._fail(batch, DiskFull(f"the disk holding the data file is full ({exc}); nothing was stored"))
                return
            log.exception("transaction of %d writes failed%s", len(batch),
                          " at COMMIT: they may or may not be stored" if committing else "; none of them is stored")
            if committing:
                self._commit_failed(outcomes, exc)
            self._fail(batch, StoreUnavailable(f"database write failed: {exc}"))
            return
        if conn.total_changes > changes:  # a commit that wrote something: there was room for it
            self._note_space_back()
        for write, value, error in outcomes:
            if error is None:
                write.future.set_result(value)
            else:
                write.future.set_exception(error)

    def _commit_failed(self, outcomes: list[tuple[_Write[Any], Any, BaseException | None]], exc: Exception) -> None:
        """A failed COMMIT (an I/O error) may still have reached the disk: the outcome is unknown,
        and the writes that can be undone are undone (undo ops are safe to run when nothing was stored)."""
        for write, value, error in outcomes:
            if error is None and write.undo is not None:
                self._queue_undo(write.undo, value)
            write.future.set_exception(OutcomeUnknown(f"the commit failed ({exc}); the write may still be stored"))

    @staticmethod
    def _apply(conn: sqlite3.Connection, write: _Write[Any]) -> tuple[Any, BaseException | None]:
        conn.execute("SAVEPOINT op")
        try:
            value = write.op(conn)
        except Exception as exc:  # noqa: BLE001 -- handed to the caller
            # A full disk (a page spilled from the cache mid-statement) may have rolled the whole
            # transaction back: then the batch fails, rather than run its next ops outside any transaction.
            if is_disk_full(exc) or not conn.in_transaction:
                raise
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return None, exc
        conn.execute("RELEASE op")
        return value, None

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        """After a failed transaction. A connection that cannot roll back is replaced: left
        inside a transaction, it would refuse every later write."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("ROLLBACK failed: reopening the database connection")
            self._drop_connection()
            return
        if conn.in_transaction:
            log.error("still inside a transaction after ROLLBACK: reopening the database connection")
            self._drop_connection()

    def _note_disk_full(self, writes: int, exc: sqlite3.Error) -> None:
        self._refused_since_said += writes
        if self._disk_full_since is not None:
            return
        self._disk_full_since = now = time.monotonic()
        # A nearly full disk flips between "full" and "room" as small writes still fit: say it once a minute.
        if now - self._said_full_at >= DISK_FULL_LOG_INTERVAL_S:
            log.error("the disk holding %s is full (%s): writes are refused as not stored until there is room "
                      "again (%d refused since the last message)", self._path, exc, self._refused_since_said)
            self._said_full_at, self._refused_since_said = now, 0

    def _note_space_back(self) -> None:
        if self._disk_full_since is None:
            return
        now = time.monotonic()
        if now - self._said_back_at >= DISK_FULL_LOG_INTERVAL_S:
            log.warning("disk space for %s is back: writes are stored again (refused for %.1f s)", self._path,
                        now - self._disk_full_since)
            self._said_back_at = now
        self._disk_full_since = None

    @staticmethod
    def _fail(batch: list[_Write[Any]], error: StoreUnavailable) -> None:
        for write in batch:
            future = write.future
            if future.done():
                continue
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(error)

    # -- the connection and the file it writes ------------------------------------------

    def _connection(self) -> sqlite3.Connection | None:
        """The open connection, or a new one (after a failure). Raises FileLost."""
        if self._conn is not None:
            return self._conn
        # Look before connecting: connecting would create a missing file.
        try:
            identity = file_identity(self._path)
        except FileNotFoundError:
            raise FileLost(f"data file {self._path} was deleted") from None
        except OSError:
            log.exception("the writer cannot reach %s", self._path)
            return None
        if self._identity is not None and identity != self._identity:
            raise FileLost(f"data file {self._path} was replaced by another file")
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("the writer cannot open %s", self._path)
            return None
        self._conn, self._identity, self._conn_synchronous = conn, identity, ""
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                log.exception("closing the database connection failed")
            self._conn = None

    def _check_file(self) -> None:
        try:
            identity = file_identity(self._path)
        except FileNotFoundError:
            raise FileLost(f"data file {self._path} was deleted") from None
        if identity != self._identity:
            raise FileLost(f"data file {self._path} was replaced by another file")

    def _lose_file(self, what: str) -> None:
        """Stop writing for good, and save what the lost file still holds through our open connection."""
        saved = "nothing could be saved: the writer had no open connection to it"
        if self._conn is not None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            rescued = self._path.with_name(f"{self._path.name}.rescued-{stamp}")
            try:
                copy = sqlite3.connect(rescued)
                try:
                    self._conn.backup(copy)
                finally:
                    copy.close()
                saved = f"what it held is saved in {rescued}"
            except sqlite3.Error as exc:
                saved = f"saving what it held to {rescued} failed: {exc}"
        self._lost = f"{what} while the endpoint ran; refusing writes until a restart ({saved})"
        log.error("%s", self._lost)
        self._drop_connection()
