"""Simulated workers for bench/fleet.py: the worker's own dispatcher (worker/dispatch.py), fake slots.

A simulator process runs many workers, each a real `Dispatcher` (its claimer and keeper threads
per endpoint, batched claims that wait at the endpoint, lease renewals, batched results, over the
worker's own client) whose slots do not hash: a job "runs" for `iterations` milliseconds on one
timer thread of the process, and its result is SHA-512 of its payload (the simulation's rule,
which the bench checks every pulled result against). The process answers its parent over a pipe:
"snapshot" (what its workers did since the last one), "stop" (every worker stops as a real one
does: waiting claims called off, jobs given back, results posted; then the final tally).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from worker.client import LEASE_HELD, ClaimAnswer, EndpointClient, Job
from worker.dispatch import Dispatcher, DispatchOptions, SlotPipe

SLOTS = 2  # a 2-vCPU worker: two slot processes, each one lane here
THREAD_STACK_BYTES = 256 * 1024  # four threads per worker: a smaller stack than the default 8 MiB


def simulated_result(payload: bytes) -> str:
    """The simulation's rule: what a simulated job's result is."""
    return hashlib.sha512(payload).hexdigest()


def simulated_seconds(iterations: int) -> float:
    """A simulated job runs a millisecond per iteration."""
    return iterations / 1000.0


class Tally:
    """What the simulated workers of one process did: requests by route (counts and failures since the
    start, round trips since the last snapshot), claims that brought jobs (round trips: no claim with
    jobs is held at the endpoint), and the answers to their results."""

    COUNTS = ("requests", "failures", "answers", "claims")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        # jobs: jobs claimed; released: jobs given back (no lane free for them, or stopping); unwaited:
        # claims answered at once, the endpoint could not let them wait
        self.claims: Counter[str] = Counter()
        self.seconds: dict[str, list[float]] = {}
        self.job_claims: list[float] = []

    def request(self, path: str, seconds: float, failed: bool) -> None:
        with self.lock:
            self.requests[path] += 1
            self.failures[path] += failed
            self.seconds.setdefault(path, []).append(seconds)

    def claim(self, answer: ClaimAnswer, seconds: float) -> None:
        with self.lock:
            if answer.jobs:
                self.job_claims.append(seconds)
                self.claims["jobs"] += len(answer.jobs)
            elif not answer.waited:
                self.claims["unwaited"] += 1

    def released(self, jobs: int) -> None:
        with self.lock:
            self.claims["released"] += jobs

    def results(self, answers: Sequence[str]) -> None:
        with self.lock:
            self.answers.update(answers)

    def snapshot(self) -> dict[str, Any]:
        """The counts so far, and the round trips since the last snapshot (handed over, they start again)."""
        with self.lock:
            taken: dict[str, Any] = {name: dict(getattr(self, name)) for name in self.COUNTS}
            taken["seconds"], taken["job_claims"] = self.seconds, self.job_claims
            self.seconds, self.job_claims = {}, []
        return taken


class TimedClient(EndpointClient):
    """The worker's client, counting and timing each request."""

    def __init__(self, base_url: str, worker_key: str, worker_id: str, tally: Tally) -> None:
        super().__init__(base_url, worker_key, worker_id)
        self.tally = tally

    def _post(self, path: str, fields: dict[str, object], timeout: float | None = None,
              interruptible: bool = False) -> tuple[int, bytes]:
        started = time.perf_counter()
        failed = True
        try:
            answer = super()._post(path, fields, timeout, interruptible)
            failed = answer[0] != 200
            return answer
        finally:
            self.tally.request(path, time.perf_counter() - started, failed)

    def claim(self, max_jobs: int = 1, max_bytes: int = 0, wait_s: float = 0.0,
              report: dict[str, object] | None = None) -> ClaimAnswer:
        started = time.perf_counter()
        answer = super().claim(max_jobs, max_bytes, wait_s, report)
        self.tally.claim(answer, time.perf_counter() - started)
        return answer

    def submit(self, results: Sequence[tuple[Job, str, float]]) -> list[str]:
        answers = super().submit(results)
        self.tally.results(answers)
        return answers

    def release(self, jobs: Sequence[Job]) -> list[str]:
        answers = super().release(jobs)
        self.tally.released(answers.count(LEASE_HELD))
        return answers


class JobClock(threading.Thread):
    """Every simulated job of the process, finished at its time by this one thread."""

    def __init__(self, wrong_every: int = 0) -> None:
        super().__init__(name="job clock", daemon=True)
        self.wrong_every = wrong_every  # every Nth job gets a wrong result: to show that the bench notices
        self.condition = threading.Condition()
        self.due: list[tuple[float, int, Dispatcher, Job, float]] = []
        self.order = itertools.count()
        self.cancelled: set[tuple[int, tuple[str, str]]] = set()
        self.runs: Counter[str] = Counter()  # work id -> times a slot started it
        self.finished = 0

    def start_job(self, dispatcher: Dispatcher, job: Job) -> None:
        started = time.monotonic()
        with self.condition:
            self.runs[job.work_id] += 1
            self.cancelled.discard((id(dispatcher), job.key))
            heapq.heappush(self.due, (started + simulated_seconds(job.iterations), next(self.order), dispatcher, job,
                                      started))
            self.condition.notify()

    def cancel(self, dispatcher: Dispatcher, key: tuple[str, str]) -> None:
        with self.condition:
            self.cancelled.add((id(dispatcher), key))

    def run(self) -> None:
        while True:
            with self.condition:
                while not self.due or self.due[0][0] > time.monotonic():
                    self.condition.wait(self.due[0][0] - time.monotonic() if self.due else None)
                ready = []
                while self.due and self.due[0][0] <= time.monotonic():
                    _, _, dispatcher, job, started = heapq.heappop(self.due)
                    if (id(dispatcher), job.key) in self.cancelled:
                        self.cancelled.discard((id(dispatcher), job.key))
                        continue
                    ready.append((dispatcher, job, started))
            for dispatcher, job, started in ready:
                self.finished += 1
                result = simulated_result(job.payload)
                if self.wrong_every and self.finished % self.wrong_every == 0:
                    result = simulated_result(job.payload + b" wrong")
                dispatcher.job_done(job.key, result, time.monotonic() - started)


class SimulatedSlot(SlotPipe):
    """A slot of one lane whose jobs the process's clock runs."""

    def __init__(self, clock: JobClock) -> None:  # no pipe: nothing runs in another process
        self.lock = threading.Lock()
        self.lanes = 1
        self.kernel = "sim"
        self.clock = clock
        self.dispatcher: Dispatcher | None = None

    def send(self, message: tuple[object, ...]) -> None:
        assert self.dispatcher is not None
        if message[0] == "run":
            self.clock.start_job(self.dispatcher, message[1])  # type: ignore[arg-type]
        elif message[0] == "cancel":
            self.clock.cancel(self.dispatcher, message[1])  # type: ignore[arg-type]


class SimulatedDispatcher(Dispatcher):
    def __init__(self, options: DispatchOptions, slots: list[SimulatedSlot], tally: Tally) -> None:
        super().__init__(options, list(slots))
        self.tally = tally

    def new_client(self, url: str) -> EndpointClient:
        return TimedClient(url, self.options.worker_key, self.options.worker_id, self.tally)


@dataclass(frozen=True)
class SimulatorSettings:
    endpoints: tuple[str, ...]
    worker_key: str
    worker_ids: tuple[str, ...]
    claim_wait: float = 20.0
    wrong_every: int = 0
    start_spread_s: float = 0.0  # workers start at random times over this long, as a fleet that grew does


def simulator(conn: Connection, settings: SimulatorSettings) -> None:
    """A simulator process: its workers run until told to stop."""
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s simulated worker: %(message)s")
    threading.stack_size(THREAD_STACK_BYTES)
    tally = Tally()
    clock = JobClock(settings.wrong_every)
    clock.start()
    dispatchers = []
    starts = sorted(random.uniform(0, settings.start_spread_s) for _ in settings.worker_ids)
    began = time.monotonic()
    for worker_id, start_at in zip(settings.worker_ids, starts, strict=True):
        time.sleep(max(0.0, began + start_at - time.monotonic()))
        slots = [SimulatedSlot(clock) for _ in range(SLOTS)]
        dispatcher = SimulatedDispatcher(DispatchOptions(settings.endpoints, settings.worker_key, worker_id,
                                                         claim_wait=settings.claim_wait), slots, tally)
        for slot in slots:
            slot.dispatcher = dispatcher
        dispatcher.start()
        dispatchers.append(dispatcher)
    conn.send("started")
    while True:
        command = conn.recv()
        if command == "snapshot":
            conn.send(tally.snapshot())
        elif command == "stop":
            with ThreadPoolExecutor(32) as pool:  # each stop waits for its threads: many at once
                list(pool.map(Dispatcher.stop, dispatchers))
            final = tally.snapshot()
            with clock.condition:
                final["runs"] = dict(clock.runs)
                final["still_running"] = len(clock.due)
            final["in_flight"] = sum(len(dispatcher.in_flight) for dispatcher in dispatchers)
            final["unposted"] = sum(len(done) for dispatcher in dispatchers for done in dispatcher.finished.values())
            conn.send(final)
            return
