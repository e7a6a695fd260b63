"""The soak's history check: what the clients saw (bench/soak_load.History) against the reference
results and against the endpoints' data files, read after the cluster stopped.

* Every acknowledged enqueue completed, with the reference result, and was handed out by pullCompleted
  once. One never received, but delivered, is in the documented at-most-once window when it was not
  taken under a delivery token that got its answer; those are counted apart and must still be readable
  at /work/<id>. One taken under such a token, or never delivered, is lost.
* No result was handed out twice, and none that nobody can account for.
* No refused enqueue (4xx, or 503/507 "not_stored") left an item behind; one whose outcome stayed
  unknown (a 504 or no answer, without an Idempotency-Key to resolve it) may have, and is counted apart.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak_load import SHORT_ITERATIONS, History, Job
from endpoint.pulls import peer_token

CLIENT_DELIVERY_PREFIX = "client:"


def reference(data: bytes, iterations: int) -> str:
    """The work as specified, written independently of the worker."""
    out = hashlib.sha512(data).digest()
    for _ in range(iterations - 1):
        out = hashlib.sha512(out).digest()
    return out.hex()


def chain(data: bytes, wanted: set[int]) -> dict[int, str]:
    """reference(data, n) for every n wanted, from one hash chain."""
    results = {}
    out = hashlib.sha512(data).digest()
    done = 1
    for count in sorted(wanted):
        for _ in range(count - done):
            out = hashlib.sha512(out).digest()
        done = count
        results[count] = out.hex()
    return results


class References:
    def __init__(self, jobs: list[Job], shared_payload: bytes) -> None:
        self.shared_payload = shared_payload
        self.long = chain(shared_payload, {job.iterations for job in jobs
                                           if job.payload == shared_payload and job.iterations > SHORT_ITERATIONS})
        self.short: dict[int, str] = {}

    def of(self, job: Job) -> str:
        if job.payload == self.shared_payload and job.iterations in self.long:
            return self.long[job.iterations]
        if job.serial not in self.short:
            self.short[job.serial] = reference(job.payload, job.iterations)
        return self.short[job.serial]


@dataclass(frozen=True)
class Row:
    node: str
    work_id: str
    iterations: int
    state: str
    result: str | None
    delivered_at: float | None
    delivery_id: str | None
    completed_at: float | None
    failed_reason: str | None
    payload: bytes | None
    attempts: int


def read_rows(db: Path, node: str) -> dict[str, Row]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT id, iterations, state, result, delivered_at, delivery_id, completed_at, "
                            "failed_reason, data, attempts FROM work_items LEFT JOIN payloads USING (seq)").fetchall()
    finally:
        conn.close()
    return {row[0]: Row(node, *row) for row in rows}


@dataclass
class Report:
    acknowledged: int = 0
    completed_right: int = 0
    received: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    window: list[str] = field(default_factory=list)  # delivered, never received, not under an answered token
    window_unreadable: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # received, but no request accounts for it
    left_behind: list[str] = field(default_factory=list)  # stored though refused, or stored twice
    refused: int = 0
    unknown: int = 0
    unknown_stored: int = 0
    by_form: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    enqueue_waits: list[float] = field(default_factory=list)  # first request sent -> acknowledged, repeats included
    attempts: Counter[int] = field(default_factory=Counter)  # attempts a completed job used -> jobs

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.duplicated or self.wrong or self.unexpected or self.left_behind
                    or self.window_unreadable)


SIZE_BOUNDS = (SHORT_ITERATIONS, 100_000, 1_000_000)  # the longest jobs of each class but the last
SIZE_CLASSES = (*(f"{low + 1:,}-{high:,} iterations"
                  for low, high in zip((0, *SIZE_BOUNDS[:-1]), SIZE_BOUNDS, strict=True)),
                f"over {SIZE_BOUNDS[-1]:,} iterations")


def size_class(iterations: int) -> str:
    return SIZE_CLASSES[sum(iterations > bound for bound in SIZE_BOUNDS)]


class Check:
    def __init__(self, history: History, shared_payload: bytes, rows: dict[str, Row],
                 readable: dict[str, tuple[str, str | None]]) -> None:
        self.history = history
        self.rows = rows
        self.readable = readable  # work id -> (state, result) from GET /work/<id>, for those never received
        self.refs = References(history.jobs, shared_payload)
        self.report = Report()
        self.answered_tokens = self._answered_tokens()
        self.received: dict[str, list] = defaultdict(list)
        for item in history.received:
            self.received[item.work_id].append(item)

    def _answered_tokens(self) -> set[str]:
        """The delivery ids of results taken under a token whose client got its answer (a 200)."""
        ids = set()
        for token, (node, answered) in self.history.tokens.items():
            if answered:
                ids.add(CLIENT_DELIVERY_PREFIX + token)
                ids.add(peer_token(node, token))
        return ids

    def run(self) -> Report:
        report = self.report
        jobs = self.history.jobs
        acknowledged = [job for job in jobs if job.outcome == "acknowledged"]
        report.acknowledged = len(acknowledged)
        report.received = len(self.history.received)
        report.refused = sum(job.outcome == "refused" for job in jobs)
        report.unknown = sum(job.outcome == "unknown" for job in jobs)
        ids = Counter(job.work_id for job in acknowledged)
        report.wrong += [f"{work_id}: one id acknowledged for {count} different enqueues"
                         for work_id, count in ids.items() if count > 1]
        for job in acknowledged:
            report.by_form[f"{job.form} ({job.client})"] += 1
            assert job.acknowledged_at is not None
            report.enqueue_waits.append(job.acknowledged_at - job.sent_at)
            self._acknowledged(job)
        accounted = {job.work_id for job in acknowledged}
        for work_id in self._extras(accounted):
            accounted.add(work_id)
            items = self.received.get(work_id, [])
            if len(items) > 1:
                report.duplicated.append(f"{work_id} (of an enqueue with an unknown outcome): handed out "
                                         f"{len(items)} times")
            report.wrong += [f"{work_id}: handed out with result {item.result}, not the stored one"
                             for item in items if item.result != self.rows[work_id].result]
        for work_id, items in self.received.items():
            if work_id not in accounted:
                report.unexpected.append(f"{work_id}: handed out {len(items)} time(s), but no request accounts for it")
        return report

    def _acknowledged(self, job: Job) -> None:
        report = self.report
        assert job.work_id is not None and job.acknowledged_at is not None
        expected = self.refs.of(job)
        row = self.rows.get(job.work_id)
        items = self.received.get(job.work_id, [])
        where = f"{job.work_id} ({job.form} by {job.client}, iterations={job.iterations})"
        if row is None:
            report.lost.append(f"{where}: acknowledged, but in neither data file")
            return
        if row.state != "completed":
            report.lost.append(f"{where}: {row.state}{': ' + row.failed_reason if row.failed_reason else ''}")
            return
        if row.result != expected:
            report.wrong.append(f"{where}: stored result {row.result} is not the reference {expected}")
            return
        report.completed_right += 1
        report.attempts[row.attempts] += 1
        if len(items) > 1:
            report.duplicated.append(f"{where}: handed out {len(items)} times ({', '.join(i.node for i in items)})")
        for item in items:
            if item.result != expected:
                report.wrong.append(f"{where}: handed out with result {item.result}, not the reference")
        if items:
            first = min(item.at for item in items)
            report.latencies[size_class(job.iterations)].append(first - job.acknowledged_at)
            report.latencies["all"].append(first - job.acknowledged_at)
            return
        self._never_received(job, row, where, expected)

    def _never_received(self, job: Job, row: Row, where: str, expected: str) -> None:
        report = self.report
        if row.delivered_at is None:
            report.lost.append(f"{where}: completed, but never handed out")
            return
        if row.delivery_id in self.answered_tokens:
            report.lost.append(f"{where}: taken under delivery id {row.delivery_id}, whose answer (a 200) lacks it")
            return
        report.window.append(f"{where}: delivered (delivery id {row.delivery_id}), never received")
        state, result = self.readable.get(job.work_id, ("not asked", None))
        if state != "completed" or result != expected:
            report.window_unreadable.append(f"{where}: GET /work/<id> says {state}, result {result}")

    def _extras(self, acknowledged: set[str]) -> set[str]:
        """Items in the data files that no acknowledgement names: each must belong to an enqueue whose
        outcome the client never learnt. Returns their ids."""
        report = self.report
        candidates: dict[int, list[Job]] = defaultdict(list)
        for job in self.history.jobs:
            candidates[job.iterations].append(job)
        explained = set()
        for row in self.rows.values():
            if row.work_id in acknowledged:
                continue
            owner = self._owner(row, candidates[row.iterations])
            if owner is not None and owner.outcome == "unknown":
                report.unknown_stored += 1
                explained.add(row.work_id)
            elif owner is not None:
                report.left_behind.append(f"{row.work_id} ({row.state}) stored for a request that was "
                                          f"{owner.outcome} ({', '.join(owner.answers)})")
            else:
                report.left_behind.append(f"{row.work_id} ({row.state}, iterations={row.iterations}) "
                                          "stored, and no request sent it")
        return explained

    def _owner(self, row: Row, jobs: list[Job]) -> Job | None:
        """The request that stored this row: the same payload and iterations (for a completed row, whose
        payload is gone: the same iterations and result)."""
        for job in jobs:
            if row.payload is not None and row.payload == job.payload:
                return job
            if row.payload is None and row.result is not None and row.result == self.refs.of(job):
                return job
        return None
