"""The store's writer, driven directly: what a caller that gave up waiting leaves behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from endpoint.store import RECENT_ARRIVALS_PENDING_SQL, RECENT_ARRIVALS_SQL, Store, StoreUnavailable


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


def test_only_results_delivered_longer_ago_than_the_retention_are_pruned(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, retention_days=7, max_attempts=1,
                  lease_seconds=0.01)
    try:
        kept_back, pulled, failed = (store.enqueue(payload, 1) for payload in (b"k", b"p", b"f"))
        for work_id in (kept_back, pulled):
            claim = store.claim("w")
            assert claim is not None and claim.work_id == work_id
            assert store.complete(work_id, "w", "e" * 128, 0.1)
        # pullCompleted hands out the newest result first: `pulled`; `kept_back` stays undelivered.
        assert [item.work_id for item in store.take_completed(1, delivery_id="t" * 32)] == [pulled]
        assert store.claim("w").work_id == failed  # and its lease expires on its only attempt
        time.sleep(0.05)
        store._writer.run(lambda conn: store._requeue_expired(conn, time.time()))

        assert store.prune_delivered() == 0  # delivered just now: kept for 7 days
        assert store.prune_delivered(now=time.time() + 8 * 86_400) == 1
        assert store.get(pulled) is None
        assert store.get(kept_back)["state"] == "completed"  # never delivered: never pruned
        assert store.get(failed)["state"] == "failed"  # failed items stay for inspection
        assert store.stats()["completed"] == 1
    finally:
        store.close()


def test_stats_count_the_items_enqueued_in_the_last_minute_whatever_their_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        old, done, waiting = (store.enqueue(payload, 1) for payload in (b"o", b"d", b"w"))
        claim = store.claim("w")
        assert claim is not None and claim.work_id == old
        assert store.claim("w").work_id == done
        assert store.complete(done, "w", "e" * 128, 0.1)
        stats = store.stats()
        assert (stats["recent_arrivals"], stats["recent_arrivals_pending"], stats["arrival_window_s"]) == (3, 1, 60.0)
        # Two minutes ago: out of the window, whatever its state.
        for work_id in (old, waiting):
            store._writer.run(lambda conn, work_id=work_id: conn.execute(
                "UPDATE work_items SET created_at = created_at - 120 WHERE id = ?", (work_id,)))
        stats = store.stats()
        assert (stats["recent_arrivals"], stats["recent_arrivals_pending"]) == (1, 0)
        assert (store.get(old)["state"], store.get(waiting)["state"]) == ("running", "pending")
        # Counted from indexes, not by walking every item the file holds: read_stats' own queries.
        for query, index in [(RECENT_ARRIVALS_SQL, "work_items_created"),
                             (RECENT_ARRIVALS_PENDING_SQL, "work_items_pending")]:
            plan = store._reader().execute(f"EXPLAIN QUERY PLAN {query}", (0.0,)).fetchall()
            assert f"USING COVERING INDEX {index}" in str(plan) or f"USING INDEX {index}" in str(plan), plan
    finally:
        store.close()
