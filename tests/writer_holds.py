"""Holding a store's writer inside its transaction, to make waits run out and commits overrun
deterministically (tests/test_store.py, tests/test_write_outcomes.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from endpoint.store import Store


class Hold:
    """A write that keeps the writer inside its transaction until released."""

    def __init__(self, store: Store) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()

        def op(conn: sqlite3.Connection) -> None:
            self.entered.set()
            self.gate.wait(30)

        self.thread = threading.Thread(target=store._writer.run, args=(op,), kwargs={"wait_s": 60})
        self.thread.start()

    def release(self) -> None:
        self.gate.set()
        self.thread.join()


class Background:
    """A call in a thread of its own, and what came of it."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = call()
            except BaseException as exc:  # noqa: BLE001 -- the test looks at it
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def outcome(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.error if self.error is not None else self.value


def queued(store: Store, count: int) -> None:
    deadline = time.monotonic() + 10
    while store._writer._queue.qsize() < count:
        assert time.monotonic() < deadline, "the writes did not reach the writer's queue"
        time.sleep(0.01)


def committing_too_long(store: Store, call: Callable[[], Any]) -> tuple[Any, Hold]:
    """Run `call` so that its write is in a transaction that does not commit within the caller's
    wait: the writer takes it in one batch with a write that holds the transaction open. Returns
    what the caller heard, and the hold to release (which then commits the batch)."""
    before = Hold(store)
    before.entered.wait(10)
    caller = Background(call)
    queued(store, 1)
    after = Hold(store)  # queued behind the caller's write: the same batch
    queued(store, 2)
    before.release()
    after.entered.wait(10)
    return caller.outcome(), after


def settle(store: Store) -> None:
    """Wait until the writer has done everything queued so far (undo writes included)."""
    for _ in range(2):
        store._writer.run(lambda conn: None)


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Hold the SQLite file's write lock from another process's point of view, as a stalled
    writer elsewhere (or a stuck disk) would: the endpoint's writer waits at BEGIN."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()
