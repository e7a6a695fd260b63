"""The store and its writer, driven directly: waits that run out, commits that overrun, leases,
idempotency keys, the pull index, the schema's invariants and the migration of older files."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from writer_holds import Background, Hold, committing_too_long, queued, settle

from endpoint.prices import PriceTable
from endpoint.store import (
    IDEMPOTENCY_TTL_S,
    RECENT_ARRIVALS_PENDING_SQL,
    RECENT_ARRIVALS_SQL,
    IdempotencyKeyReused,
    LeaseAnswer,
    OutcomeUnknown,
    Store,
    StoreUnavailable,
)
from endpoint.usage import Listed
from endpoint.writer import Writer

RESULT = "e" * 128
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, write_wait_s=2.0)
    try:
        yield opened
    finally:
        opened.close()


# -- waits that run out ---------------------------------------------------------------------


def test_a_write_whose_caller_gave_up_is_skipped_not_applied_later(store: Store) -> None:
    hold = Hold(store)
    hold.entered.wait(10)
    applied = []
    with pytest.raises(StoreUnavailable, match="nothing was stored"):
        store._writer.run(lambda conn: applied.append(1), wait_s=0.2)
    hold.release()
    settle(store)
    assert applied == []


def test_an_enqueue_that_timed_out_leaves_no_item(store: Store) -> None:
    hold = Hold(store)
    hold.entered.wait(10)
    with pytest.raises(StoreUnavailable):
        store.enqueue(b"too late", 5)
    hold.release()
    settle(store)
    assert store.stats()["pending"] == 0


def test_a_write_behind_slow_writes_in_its_own_batch_is_skipped_once_its_wait_ran_out(store: Store) -> None:
    """The wait is checked for each write when the writer reaches it, not once per batch."""
    before = Hold(store)
    before.entered.wait(10)
    slow_first = Background(lambda: store._writer.run(lambda conn: time.sleep(2.5), wait_s=60))
    queued(store, 1)
    late = Background(lambda: store.enqueue(b"behind a slow write", 1))
    queued(store, 2)
    before.release()
    assert isinstance(late.outcome(), StoreUnavailable)
    slow_first.outcome()
    settle(store)
    assert store.stats()["pending"] == 0


def test_an_enqueue_whose_commit_overran_is_outcome_unknown_and_its_key_finds_it(store: Store) -> None:
    heard, hold = committing_too_long(store, lambda: store.enqueue(b"slow commit", 3, idempotency_key="k-1"))
    assert isinstance(heard, OutcomeUnknown)  # not StoreUnavailable: it may well be stored
    retry = Background(lambda: store.enqueue(b"slow commit", 3, idempotency_key="k-1"))
    hold.release()
    replayed = retry.outcome()
    assert replayed.replayed
    assert store.get(replayed.work_id)["state"] == "pending"
    again = store.enqueue(b"slow commit", 3, idempotency_key="k-1")
    assert (again.work_id, again.replayed) == (replayed.work_id, True)
    assert store.stats()["pending"] == 1


def test_an_enqueue_without_key_whose_commit_overran_is_undone(store: Store) -> None:
    heard, hold = committing_too_long(store, lambda: store.enqueue(b"nobody has its id", 3))
    assert isinstance(heard, OutcomeUnknown)
    hold.release()
    settle(store)
    assert store.stats()["pending"] == 0  # a retry of the client cannot make it twice


def test_a_claim_whose_commit_overran_is_given_back_without_using_an_attempt(store: Store) -> None:
    work_id = store.enqueue(b"claimed by nobody", 3).work_id
    heard, hold = committing_too_long(store, lambda: store.claim("w"))
    assert isinstance(heard, OutcomeUnknown)
    hold.release()
    settle(store)
    item = store.get(work_id)
    assert (item["state"], item["attempts"]) == ("pending", 0)
    assert store.claim("w2").work_id == work_id


def test_a_claim_that_overran_but_reached_its_worker_on_a_retry_is_not_given_back(store: Store) -> None:
    work_id = store.enqueue(b"claimed twice by the same token", 3).work_id
    heard, hold = committing_too_long(store, lambda: store.claim("w", claim_token="t-1"))
    assert isinstance(heard, OutcomeUnknown)
    retry = Background(lambda: store.claim("w", claim_token="t-1"))  # the worker repeats its claim at once
    queued(store, 1)
    hold.release()
    assert retry.outcome().work_id == work_id
    settle(store)
    item = store.get(work_id)
    assert (item["state"], item["attempts"], item["worker_id"]) == ("running", 1, "w")  # the undo left it alone


def test_a_take_whose_commit_overran_is_undone_and_its_results_go_out_again(store: Store) -> None:
    work_id = store.enqueue(b"result", 1).work_id
    claim = store.claim("w")
    assert store.complete(claim.work_id, "w", RESULT, 0.1) is LeaseAnswer.DONE
    heard, hold = committing_too_long(store, lambda: store.take_completed(10, "1" * 32))
    assert isinstance(heard, OutcomeUnknown)
    hold.release()
    settle(store)
    assert store.get(work_id)["delivered_at"] is None
    assert [item.work_id for item in store.take_completed(10, "2" * 32)] == [work_id]


def test_the_lease_runs_from_the_claims_commit_not_from_the_request(store: Store) -> None:
    store.enqueue(b"queued behind a slow writer", 1)
    hold = Hold(store)
    hold.entered.wait(10)
    caller = Background(lambda: store.claim("w"))
    time.sleep(1.5)  # the claim waits behind the slow write
    released_at = time.time()
    hold.release()
    claim = caller.outcome()
    item = store.get(claim.work_id)
    assert item["claimed_at"] >= released_at - 0.05
    assert item["lease_expires_at"] == pytest.approx(item["claimed_at"] + store.lease_seconds)


# -- the writer's connection and file -------------------------------------------------------------


class FailingConnection(sqlite3.Connection):
    """A connection whose next COMMIT and ROLLBACK fail, as on a disk that went away for a moment."""

    fail: set[str] = set()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql in self.fail:
            self.fail.discard(sql)
            raise sqlite3.OperationalError(f"injected failure of {sql}")
        return super().execute(sql, *args)


def test_a_failed_rollback_reopens_the_connection_and_later_writes_work(tmp_path: Path) -> None:
    path = tmp_path / "w.sqlite3"
    sqlite3.connect(path).executescript("PRAGMA journal_mode = WAL; CREATE TABLE t (v);").close()
    opened: list[FailingConnection] = []

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=FailingConnection)
        opened.append(conn)
        return conn

    writer = Writer(path, connect, "FULL", wait_s=5)
    try:
        FailingConnection.fail = {"COMMIT", "ROLLBACK"}
        with pytest.raises(OutcomeUnknown, match="commit failed"):
            writer.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        # The connection was left inside its transaction: the writer replaced it.
        writer.run(lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
        assert len(opened) == 2
        with sqlite3.connect(path) as check:
            assert check.execute("SELECT v FROM t").fetchall() == [(2,)]
    finally:
        FailingConnection.fail = set()
        writer.close()


def test_a_deleted_data_file_stops_writes_and_what_it_held_is_saved(store: Store, tmp_path: Path) -> None:
    acknowledged = [store.enqueue(f"item {index}".encode(), 1).work_id for index in range(5)]
    store.path.unlink()
    with pytest.raises(StoreUnavailable, match="was deleted"):
        store.enqueue(b"into a file that is gone", 1)
    with pytest.raises(StoreUnavailable, match="refusing writes"):
        store.enqueue(b"nor later", 1)
    with pytest.raises(StoreUnavailable):
        store.claim("w")
    assert not store.path.exists()  # and no new, empty file was made in its place
    (rescued,) = tmp_path.glob("a.sqlite3.rescued-*")
    with sqlite3.connect(rescued) as conn:
        assert sorted(row[0] for row in conn.execute("SELECT id FROM work_items")) == sorted(acknowledged)
        assert conn.execute("SELECT count(*) FROM payloads").fetchone() == (5,)


def test_a_replaced_data_file_stops_writes(store: Store, tmp_path: Path) -> None:
    store.enqueue(b"before", 1)
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).close()
    other.replace(store.path)
    with pytest.raises(StoreUnavailable, match="replaced"):
        store.enqueue(b"after", 1)


# -- leases ---------------------------------------------------------------------------------


def test_renew_and_release_say_why_a_lease_is_not_held(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, lease_seconds=0.05, max_attempts=1)
    try:
        done, expired, taken = (store.enqueue(payload, 1).work_id for payload in (b"d", b"e", b"t"))
        first = store.claim("w")
        assert first.work_id == done
        assert store.renew(done, 1, "w") is LeaseAnswer.DONE
        assert store.complete(done, "w", RESULT, 0.1) is LeaseAnswer.DONE
        assert store.renew(done, 1, "w") is LeaseAnswer.COMPLETED
        assert store.complete(done, "w", RESULT, 0.1) is LeaseAnswer.COMPLETED
        assert store.claim("w").work_id == expired
        time.sleep(0.1)
        store._writer.run(lambda conn: store._requeue_expired(conn, time.time()))
        assert store.get(expired)["state"] == "failed"  # the last attempt's lease expired
        assert store.renew(expired, 1, "w") is LeaseAnswer.NOT_LEASED
        assert store.complete(expired, "w", RESULT, 0.1) is LeaseAnswer.DONE  # a late result still counts
        assert store.claim("other").work_id == taken
        assert store.renew(taken, 1, "w") is LeaseAnswer.LEASED_ELSEWHERE
        assert store.release(taken, 1, "w") is LeaseAnswer.LEASED_ELSEWHERE
        assert store.renew("a-0000000000000000", 1, "w") is LeaseAnswer.NO_SUCH_ITEM
    finally:
        store.close()


def test_a_repeated_claim_token_gets_the_same_lease_back(store: Store) -> None:
    first, second = (store.enqueue(payload, 1).work_id for payload in (b"1", b"2"))
    claim = store.claim("w", claim_token="t1")
    assert (claim.work_id, claim.attempt) == (first, 1)
    again = store.claim("w", claim_token="t1")  # the answer to the first was lost
    assert (again.work_id, again.attempt, again.payload) == (first, 1, b"1")
    assert store.claim("someone-else", claim_token="t1").work_id == second  # a token is the worker's own
    assert store.get(first)["attempts"] == 1


def test_leases_held_across_a_restart_get_time_to_renew_and_do_not_count_if_unrenewed(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    store = Store(path, "a", maintenance_interval=3600, lease_seconds=0.3, max_attempts=1)
    alive, gone = (store.enqueue(payload, 1).work_id for payload in (b"alive", b"gone"))
    assert store.claim("w1").work_id == alive
    assert store.claim("w2").work_id == gone
    store.close()
    time.sleep(0.5)  # both leases expire while the endpoint is down

    store = Store(path, "a", maintenance_interval=3600, lease_seconds=0.3, max_attempts=1)
    try:
        for work_id in (alive, gone):
            assert store.get(work_id)["lease_expires_at"] > time.time()  # a full lease to renew in
        assert store.renew(alive, 1, "w1") is LeaseAnswer.DONE  # its worker is still there
        time.sleep(0.4)
        store._writer.run(lambda conn: store._requeue_expired(conn, time.time()))
        # Both leases expired now. The one renewed after the restart counts (its last attempt: failed);
        # the one nobody renewed since the downtime is given back without counting.
        assert (store.get(alive)["state"], store.get(alive)["attempts"]) == ("failed", 1)
        assert (store.get(gone)["state"], store.get(gone)["attempts"]) == ("pending", 0)
    finally:
        store.close()


# -- idempotency keys ------------------------------------------------------------------------


def test_an_idempotency_key_is_bound_to_its_request_and_expires(store: Store) -> None:
    first = store.enqueue(b"payload", 5, idempotency_key="order-17")
    assert store.enqueue(b"payload", 5, idempotency_key="order-17") == type(first)(first.work_id, True)
    for payload, iterations in ((b"other payload", 5), (b"payload", 6)):
        with pytest.raises(IdempotencyKeyReused, match=first.work_id):
            store.enqueue(payload, iterations, idempotency_key="order-17")
    assert store.enqueue(b"payload", 5, idempotency_key="order-18").work_id != first.work_id
    assert store.stats()["pending"] == 2

    assert store.prune_idempotency_keys(now=time.time() + IDEMPOTENCY_TTL_S + 1) == 2
    later = store.enqueue(b"payload", 5, idempotency_key="order-17")
    assert not later.replayed and later.work_id != first.work_id


def test_an_expired_key_not_yet_pruned_makes_a_new_item(store: Store) -> None:
    first = store.enqueue(b"payload", 5, idempotency_key="k")
    store._writer.run(lambda conn: conn.execute(
        "UPDATE idempotency_keys SET created_at = created_at - ?", (IDEMPOTENCY_TTL_S + 1,)))
    again = store.enqueue(b"other payload", 5, idempotency_key="k")
    assert not again.replayed and again.work_id != first.work_id


# -- the pull index --------------------------------------------------------------------------


def test_the_take_reads_only_undelivered_results_however_long_the_history(store: Store) -> None:
    now = time.time()
    store._writer.run(lambda conn: conn.executemany(
        """INSERT INTO work_items (id, iterations, payload_bytes, state, attempts, worker_id, created_at,
                                   claimed_at, completed_at, result, delivered_at, delivery_id)
           VALUES (?, 1, 1, 'completed', 1, 'w', ?, ?, ?, ?, ?, 'old')""",
        [(f"a-{index:016x}", now, now, now - index, RESULT, now) for index in range(5000)]))
    store._writer.run(lambda conn: conn.execute("ANALYZE"))
    statements: list[str] = []
    store._writer.run(lambda conn: conn.set_trace_callback(statements.append))
    assert store.take_completed(10, "3" * 32) == []
    store._writer.run(lambda conn: conn.set_trace_callback(None))
    reader = store._reader()
    reader.set_trace_callback(statements.append)
    assert store.stats()["undelivered"] == 0
    reader.set_trace_callback(None)
    # The store's own statements, as they ran: pullCompleted's take and /stats' undelivered count.
    take = next(sql for sql in statements if "UPDATE work_items SET delivered_at" in sql)
    count = next(sql for sql in statements if "delivered_at IS NULL" in sql and "count(*)" in sql)
    for statement in (take, count):
        plan = str(reader.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall())
        assert "work_items_undelivered" in plan and "work_items_recently_completed" not in plan, plan


# -- the schema's invariants and the migration -----------------------------------------------------------


@pytest.mark.parametrize(("change", "broken"), [
    ("UPDATE work_items SET state = 'completed', completed_at = 1", "a completed item has a result"),
    ("UPDATE work_items SET result = 'x'", "a result is 128 hex digits, on completed items only"),
    ("UPDATE work_items SET delivered_at = 1, delivery_id = 'd'", "only completed items are delivered"),
    ("UPDATE work_items SET state = 'running'", "a running item has a lease"),
    ("UPDATE work_items SET state = 'failed'", "a failed item says why"),
    ("UPDATE work_items SET attempts = -1", "attempts are not negative"),
])
def test_the_schema_refuses_rows_that_break_the_states_invariants(store: Store, change: str, broken: str) -> None:
    work_id = store.enqueue(b"x", 1).work_id
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        store._writer.run(lambda conn: conn.execute(change))
    assert store.get(work_id)["state"] == "pending", broken


def make_version_2_file(path: Path) -> dict[str, str]:
    """A file as the previous schema made it, with an item in every state; returns id -> state."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript((DATA / "schema_v2.sql").read_text())
    conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', 'a')")
    now = time.time()
    rows = {
        "a-0000000000000001": ("pending", 0, None, None, None, None, None, None),
        "a-0000000000000002": ("running", 1, "w", now, now + 30, None, None, None),
        "a-0000000000000003": ("completed", 1, "w", now, None, now, RESULT, None),
        "a-0000000000000004": ("completed", 2, "w", now, None, now, RESULT, now),
        "a-0000000000000005": ("failed", 3, "w", now, None, None, None, None),
    }
    for work_id, (state, attempts, worker, claimed, lease, completed, result, delivered) in rows.items():
        seq = conn.execute(
            """INSERT INTO work_items (id, iterations, payload_bytes, state, attempts, worker_id, created_at,
                   claimed_at, lease_expires_at, completed_at, duration_s, result, delivered_at, delivery_id,
                   failed_reason)
               VALUES (?, 7, 3, ?, ?, ?, ?, ?, ?, ?, 0.5, ?, ?, ?, ?)""",
            (work_id, state, attempts, worker, now - 60, claimed, lease, completed, result, delivered,
             "d" * 32 if delivered else None, "lease expired on each of 3 attempts" if state == "failed" else None),
        ).lastrowid
        if state in ("pending", "running", "failed"):
            conn.execute("INSERT INTO payloads (seq, data) VALUES (?, ?)", (seq, b"abc"))
    conn.close()
    return {work_id: values[0] for work_id, values in rows.items()}


def test_a_version_2_file_is_rebuilt_with_the_constraints_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    states = make_version_2_file(path)
    store = Store(path, "a", maintenance_interval=3600)
    try:
        for work_id, state in states.items():
            assert store.get(work_id)["state"] == state
        assert store.get("a-0000000000000004")["delivered_at"] is not None
        counts = {state: list(states.values()).count(state) for state in ("pending", "running", "completed", "failed")}
        assert {state: store.stats()[state] for state in counts} == counts  # the state counts still agree
        assert store.stats()["undelivered"] == 1
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (4,)
            assert conn.execute("SELECT count(*) FROM payloads").fetchone() == (3,)
            indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            triggers = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # What both lines of version 3 added: the dashboard's history and the workers' listing (their cost).
        assert {"scaler_runs", "event_counts", "duration_buckets", "samples", "fleet_machines"} <= tables
        assert {"work_items_undelivered", "work_items_pending", "work_items_leased"} <= indexes
        assert triggers == {"work_items_count_insert", "work_items_count_update", "work_items_count_delete",
                            "work_items_enqueued", "work_items_completed", "work_items_failed",
                            "work_items_lease_expired"}  # the counters' triggers made again after the rebuild
        counted = store.history.counters()  # started from the rows the old file holds
        assert (counted["enqueued"], counted["completed"], counted["failed"]) == \
            (len(states), counts["completed"], counts["failed"])
        with pytest.raises(sqlite3.IntegrityError):
            store._writer.run(lambda conn: conn.execute(
                "UPDATE work_items SET result = NULL WHERE state = 'completed'"))
        # And it works as a new file would: the pending item is claimed with its payload, then completed.
        claim = store.claim("w")
        assert (claim.work_id, claim.payload) == ("a-0000000000000001", b"abc")
        assert store.complete(claim.work_id, "w", RESULT, 0.1) is LeaseAnswer.DONE
        assert len(store.take_completed(10, "4" * 32)) == 2
        usage = store.usage(PriceTable())
        usage.record([Listed("i-0abc", "c7i.large", "spot", time.time() - 300)])
        assert usage.figures()["last_hour"]["worker_seconds"] == pytest.approx(300, abs=5)
    finally:
        store.close()
    reopened = Store(path, "a", maintenance_interval=3600)  # the next start changes nothing
    reopened.close()


def test_a_file_that_cannot_take_the_constraints_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    make_version_2_file(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE work_items SET result = NULL WHERE id = 'a-0000000000000003'")
    with pytest.raises(RuntimeError, match="nothing was changed"):
        Store(path, "a", maintenance_interval=3600)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM work_items").fetchone() == (5,)


# -- retention and figures --------------------------------------------------------------------


def test_workers_not_heard_from_for_the_retention_are_forgotten(tmp_path: Path) -> None:
    """A fleet replaced every day leaves a thousand worker ids a day: /stats must not scan them all."""
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, retention_days=7)
    try:
        now = time.time()
        for worker_id, seen in (("old", now - 8 * 86_400), ("last-week", now - 6 * 86_400), ("now", now)):
            store._record_contact(worker_id, seen)
        store._flush_contacts()
        assert store.prune_workers() == 1
        with sqlite3.connect(tmp_path / "a.sqlite3") as conn:
            assert {row[0] for row in conn.execute("SELECT worker_id FROM workers")} == {"last-week", "now"}
        conn.close()
        assert [worker["id"] for worker in store.stats()["workers"]] == ["now"]
        assert store.prune_workers(now=now + 2 * 86_400) == 1  # "last-week" is 8 days old by then, "now" 2
    finally:
        store.close()


def test_only_results_delivered_longer_ago_than_the_retention_are_pruned(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, retention_days=7, max_attempts=1,
                  lease_seconds=0.01)
    try:
        kept_back, pulled, failed = (store.enqueue(payload, 1).work_id for payload in (b"k", b"p", b"f"))
        for work_id in (kept_back, pulled):
            claim = store.claim("w")
            assert claim is not None and claim.work_id == work_id
            assert store.complete(work_id, "w", RESULT, 0.1) is LeaseAnswer.DONE
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


def test_stats_count_the_items_enqueued_in_the_last_minute_whatever_their_state(store: Store) -> None:
    old, done, waiting = (store.enqueue(payload, 1).work_id for payload in (b"o", b"d", b"w"))
    claim = store.claim("w")
    assert claim is not None and claim.work_id == old
    assert store.claim("w").work_id == done
    assert store.complete(done, "w", RESULT, 0.1) is LeaseAnswer.DONE
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
