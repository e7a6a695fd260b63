"""The store's writer, driven directly: what a caller that gave up waiting leaves behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from endpoint.store import Store, StoreUnavailable


def test_a_write_whose_caller_gave_up_is_skipped_not_applied_later(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        release = threading.Event()
        blocker = threading.Thread(target=store._writer.run, args=(lambda conn: release.wait(10),))
        blocker.start()
        time.sleep(0.2)  # the writer is busy with the blocking write
        applied = []
        with pytest.raises(StoreUnavailable, match="nothing was stored"):
            store._writer.run(lambda conn: applied.append(1), timeout=0.2)
        release.set()
        blocker.join()
        store._writer.run(lambda conn: None)  # the writer went on past the skipped write
        assert applied == []
    finally:
        store.close()


def test_an_enqueue_that_timed_out_leaves_no_item(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        release = threading.Event()
        blocker = threading.Thread(target=store._writer.run, args=(lambda conn: release.wait(10),))
        blocker.start()
        time.sleep(0.2)
        original = store._writer.run
        store._writer.run = lambda op, **kwargs: original(op, timeout=0.2)  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            store.enqueue(b"too late", 5)
        store._writer.run = original  # type: ignore[method-assign]
        release.set()
        blocker.join()
        assert store.stats()["pending"] == 0
    finally:
        store.close()
