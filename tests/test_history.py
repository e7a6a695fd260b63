"""The store's counters, samples and scaler runs (endpoint/history.py), driven directly: what each
counter counts (and what it does not), a sample a minute, retention and bounds, percentiles."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_for
from endpoint import dashboard
from endpoint.history import SCALER_RUNS_KEPT, ScalerEvent, ScalerRun
from endpoint.store import Store

RESULT = "e" * 128


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600, lease_seconds=0.2, max_attempts=2,
                   retention_days=1)
    try:
        yield opened
    finally:
        opened.close()


def test_the_counters_count_what_they_name(store: Store) -> None:
    first = store.enqueue(b"one", 1).work_id
    store.enqueue(b"two", 1, idempotency_key="k")
    store.enqueue(b"two", 1, idempotency_key="k")  # a replay makes no item, and is not counted
    claim = store.claim("w")
    assert claim is not None and claim.work_id == first
    store.release(first, claim.attempt, "w")  # given back by a stopping worker: no expiry
    assert store.history.counters()["lease_expired"] == 0
    for _ in range(2):  # two leases that expire: the second one fails the item (max_attempts 2)
        assert store.claim("w") is not None
        time.sleep(0.3)
        store._writer.run(lambda conn: store._requeue_expired(conn, time.time()))
    counts = store.history.counters()
    assert (counts["enqueued"], counts["lease_expired"], counts["failed"]) == (2, 2, 1)

    second = store.claim("w")
    assert second is not None
    store.complete(second.work_id, "w", RESULT, 0.3)
    store.complete(second.work_id, "w", RESULT, 0.3)  # a repeat stores nothing
    store.complete(first, "w", RESULT, None)  # a late result completes the failed item; no run time given
    counts = store.history.counters()
    assert (counts["completed"], counts["failed"]) == (2, 1)
    buckets = store.history.buckets()
    assert sum(items for _, items, _ in buckets["job_run"]) == 1
    assert [le for le, items, _ in buckets["job_run"] if items] == [0.5]  # 0.3 s: in the bucket up to 0.5
    assert sum(items for _, items, _ in buckets["time_to_result"]) == 2

    assert len(store.take_completed(10, "t" * 32)) == 2
    assert store.give_back("t" * 32) == 2
    assert len(store.take_completed(10, "u" * 32)) == 2
    counts = store.history.counters()
    assert (counts["delivered"], counts["given_back"]) == (4, 2)


def test_a_sample_a_minute_once_and_pruned_after_the_retention(store: Store) -> None:
    now = time.time()
    history = store.history
    # The store samples at once when it opens: the baseline.
    (started,) = wait_for(lambda: [sample["at"] for sample in history.samples(0)], 5, "the first sample")
    assert started in (int(now // 60) * 60, int(now // 60) * 60 - 60)
    store.enqueue(b"x", 1)
    later = started + 600
    assert history.sample_if_due(store.stats, now=later + 1)
    assert not history.sample_if_due(store.stats, now=later + 59)
    assert history.sample_if_due(store.stats, now=later + 61)
    samples = history.samples(later)
    assert [sample["at"] for sample in samples] == [later, later + 60]
    assert samples[0]["enqueued_total"] == 1 and samples[0]["pending"] == 1
    assert len(json.loads(history._reader().execute("SELECT durations FROM samples LIMIT 1").fetchone()[0])
               ["job_run"]) == 19

    old = started - 2 * 86_400  # retention_days=1
    store._writer.run(lambda conn: conn.execute(
        "INSERT INTO samples SELECT ?, enqueued_total, completed_total, failed_total, delivered_total, pending, "
        "running, oldest_pending_age_s, workers_heard_from, durations FROM samples WHERE at = ?", (old, later)))
    assert history.prune(now) == 1
    assert [sample["at"] for sample in history.samples(0)] == [started, later, later + 60]


def test_scaler_runs_are_bounded_in_number_and_pruned_after_the_retention(store: Store) -> None:
    now = time.time()
    rows = [(f"r{index}", now - index, now - index, "reason", 0, 0, 0, 0, 0, "closed")
            for index in range(SCALER_RUNS_KEPT + 5)]
    rows.append(("ancient", now - 3 * 86_400, now, "reason", 0, 0, 0, 0, 0, "closed"))
    store._writer.run(lambda conn: conn.executemany(
        "INSERT INTO scaler_runs (run_id, recorded_at, updated_at, reason, needed, decided, allowed, ready, booting, "
        "breaker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows))
    assert store.history.prune(now) == 6
    kept = store.history._reader().execute("SELECT count(*), min(recorded_at) FROM scaler_runs").fetchone()
    assert kept[0] == SCALER_RUNS_KEPT and kept[1] == pytest.approx(now - SCALER_RUNS_KEPT + 1)
    assert [run["run_id"] for run in store.history.runs(2)] == ["r0", "r1"]


def test_a_run_record_repeated_or_grown_applies_each_outcome_once(store: Store) -> None:
    fail = ScalerEvent("provisioning_failure", "provisioning i-1: ssh refused")
    run = ScalerRun("r1", "reason", needed=2, decided=2, allowed=2, ready=0, booting=0, breaker="closed",
                    breaker_threshold=3, launched=2)
    store.history.record_run(run)
    grown = ScalerRun(**{**vars(run), "events": (fail, ScalerEvent("success")), "provisioned": 1})
    for _ in range(3):
        store.history.record_run(grown)
    counts = store.history.counters()
    assert (counts["scaler_runs"], counts["scaler_launched"], counts["scaler_provisioned"],
            counts["scaler_provisioning_failures"]) == (1, 2, 1, 1)
    (recorded,) = store.history.runs(5)
    assert (recorded["provisioning_failures"], recorded["errors"]) == (1, ["provisioning i-1: ssh refused"])
    scaler = store.stats()["scaler"]
    assert (scaler["consecutive_failures"], scaler["breaker_open"]) == (0, False)  # the success came after


def test_percentiles_interpolate_within_buckets_as_prometheus_does() -> None:
    bounds = [0.1, 1.0, 10.0, float("inf")]
    assert dashboard.quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(0.55)
    assert dashboard.quantile(bounds, [0, 0, 0, 4], 0.99) == 10.0  # beyond the last bound: at least that
    assert dashboard.quantile(bounds, [0, 0, 0, 0], 0.5) is None
    buckets = {"job_run": [(le, items, 0.0) for le, items in zip(bounds, [5, 5, 0, 0], strict=True)],
               "time_to_result": [(le, 0, 0.0) for le in bounds]}
    found = dashboard.percentiles(buckets, {"job_run": [5, 0, 0, 0], "time_to_result": [0, 0, 0, 0]})
    assert found["job_run"]["jobs"] == 5 and found["job_run"]["p50"] == pytest.approx(0.55)
    assert found["time_to_result"] == {"jobs": 0, "p50": None, "p90": None, "p99": None}


def test_windows_bin_rates_per_minute_and_gauges_with_gaps() -> None:
    now = 100 * 3600 + 30.0
    points = [{"at": now - 150, "enqueued_total": 0, "completed_total": 0, "pending": 1, "running": 0,
               "workers_heard_from": 0},
              {"at": now - 90, "enqueued_total": 30, "completed_total": 10, "pending": 20, "running": 1,
               "workers_heard_from": 1},
              {"at": now, "enqueued_total": 31, "completed_total": 31, "pending": 0, "running": 0,
               "workers_heard_from": 2}]
    hour = dashboard.window(points, [{"at": now - 60, "workers": 2, "ready": 1, "launched": 1, "terminated": 0,
                                      "failures": 0}], now, 3600, 60)
    assert len(hour["enqueued"]) == 60
    assert hour["enqueued"][-3:] == [30, 1, 0] and hour["completed"][-3:] == [10, 21, 0]
    assert hour["pending"][-4:] == [None, 1, 20, 0]
    assert hour["launched"][-2] == 1 and hour["fleet"][-2] == 2 and hour["fleet"][-1] is None
    day = dashboard.window(points, [], now, 86_400, 600)
    assert len(day["enqueued"]) == 144 and sum(day["enqueued"]) == pytest.approx(3.1)  # per minute in 10-minute bins
