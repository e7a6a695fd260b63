"""The supervisor's side of the work: one claimer for all slots, batched leases and results.

Per endpoint two threads, each with its own connection:

* the claimer asks for as many jobs as the worker has free lanes (its share of them, as each
  endpoint has a claimer) in one request, which waits at the endpoint until work arrives or
  `claim_wait` passes; so an idle worker sends one request per endpoint every `claim_wait`
  seconds, and new work reaches it at once. An endpoint that cannot let the claim wait (too
  many waiting) answers at once, and the claimer then polls every `poll_interval`.
* the keeper posts finished results (all that are waiting, in one request) and renews the
  leases of every job in flight there (in one request, every third of the lease; again soon
  after a failure). A job completed or leased elsewhere is cancelled in its lane alone; one
  whose lease merely expired is finished, as its result still counts.

Jobs go to the slot with the most free lanes, so a few jobs spread over the cores (each then
runs the scalar kernel alone), and many fill every lane. A job that comes with no lane free waits
in the worker only if the lanes finish it soon (short jobs, PREFETCH_HORIZON_S); any other is
given back at once, so that an idle worker takes it. Jobs waiting for a lane take it by turns of
their endpoints. A worker whose lanes stay busy calls off its claims at the other endpoints.

A drain (a Spot interruption notice, worker/interruption.py) ends the claims as a stop does
(waiting claims called off, jobs that arrive given back), gives back at once the jobs still
waiting for a lane, and tells the slots its deadline: each gives back the jobs that cannot end
by then (worker/slot.py), which the keeper releases in one request; the keepers go on posting
results and renewing the leases of the jobs that finish.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from worker.client import (
    ALREADY_COMPLETED,
    LEASE_HELD,
    NOT_LEASED,
    STORED,
    ClaimCalledOff,
    EndpointClient,
    EndpointDown,
    Job,
    Rejected,
)

log = logging.getLogger("worker")

MAX_CLAIM_BYTES = 16 * 1024 * 1024  # payloads per claim: four of the endpoint's default largest
MAX_CLAIM_JOBS = 256  # the endpoint's bound on a claim
SLOTS_READY_WAIT_S = 10.0  # the first claims wait this long at most for every slot to be ready
RESULTS_LINGER_S = 0.005  # a result waits this long for others to go in the same request
RESULTS_ENOUGH = 64  # ... unless that many wait already
PREFETCH_HORIZON_S = 0.05  # jobs beyond the free lanes: what the lanes finish within this time
MAX_ITEMS_PER_REQUEST = 1000  # the endpoint's bound on a batch
# A worker whose lanes are all busy for longer than this calls off its claims at the other endpoints:
# a claim of it woken there for new work would be a wake spent on a worker that cannot take the work.
CALL_OFF_AFTER_S = 1.0
# A stopping worker keeps offering its jobs back (or its results) this long to an endpoint that
# does not answer -- one being restarted, say -- so that the leases need not expire and count.
GIVE_BACK_PATIENCE_S = 10.0


class Backoff:
    """When to try an endpoint again after it failed: doubling delays with jitter."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self._first, self._cap = first, cap
        self._delay = 0.0
        self._next_try = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._next_try

    def next_try(self) -> float:
        return self._next_try

    def failed(self) -> float:
        self._delay = min(self._cap, self._delay * 2 if self._delay else self._first)
        wait = self._delay * random.uniform(0.5, 1.0)
        self._next_try = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self._delay = 0.0
        self._next_try = 0.0


@dataclass(frozen=True)
class DispatchOptions:
    endpoints: tuple[str, ...]
    worker_key: str  # never the cluster secret
    worker_id: str
    claim_wait: float = 30.0
    poll_interval: float = 0.5
    max_backoff: float = 30.0
    submit_patience: float = 3600.0
    tls_ca: str = ""


@dataclass
class InFlight:
    job: Job
    slot: int | None  # None: waiting for a free lane (a short job taken early)
    renewing: bool = True  # False once the lease expired: finish it, but do not renew
    renew_at: float = 0.0  # monotonic: a third of the lease after the claim or the last renewal
    started: float = 0.0  # monotonic: when it went into its lane

    def __post_init__(self) -> None:
        self.renew_at = time.monotonic() + self.job.lease_seconds / 3


@dataclass
class Finished:
    job: Job
    result: str
    seconds: float
    since: float = field(default_factory=time.monotonic)  # first offered


class SlotPipe:
    """The supervisor's end of a slot's pipe; sends from several threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.lanes = 0  # known once the slot said which kernel it runs
        self.kernel = ""

    def send(self, message: tuple[object, ...]) -> None:
        # A slot that died gets no message: the supervisor restarts it and gives its jobs back.
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


class Dispatcher:
    """Jobs in flight and results waiting, shared by the claimers, keepers and the slots' reader."""

    def __init__(self, options: DispatchOptions, slots: list[SlotPipe]) -> None:
        self.options = options
        self.slots = slots
        self.state = threading.Condition()
        self.in_flight: dict[tuple[str, str], InFlight] = {}
        self.finished: dict[str, list[Finished]] = {url: [] for url in options.endpoints}
        self.reserved: dict[str, int] = {url: 0 for url in options.endpoints}
        self.pending_at: dict[str, int] = {}  # what each endpoint said it still had pending
        # A moving mean of the seconds per iteration that jobs took in their lanes: a job's length is
        # estimated from its iterations, so that a run of short jobs says nothing of a long one's.
        self.iteration_seconds: float | None = None
        self.last_iterations: dict[str, int] = {}  # of the last job claimed from each endpoint
        self.turns = itertools.count()  # jobs waiting for a lane take it by turns of their endpoints
        self.last_turn: dict[str, int] = {}
        self.stopping = threading.Event()
        self.claims_over = threading.Event()  # set by a stop or a drain: nothing more is claimed
        self.drain_deadline = 0.0  # unix seconds, once a drain began: jobs not done by then go back
        self.returned: dict[str, list[Job]] = {url: [] for url in options.endpoints}  # to give back now
        self.last_work = time.monotonic()
        self.clients: dict[str, EndpointClient] = {}  # the claimers', to abort a waiting claim
        self.threads: list[threading.Thread] = []

    # -- what the supervisor asks ----------------------------------------------------------

    def start(self) -> None:
        for url in self.options.endpoints:
            for name, target in (("claimer", self.claim_loop), ("keeper", self.keep_loop)):
                thread = threading.Thread(target=target, args=(url,), name=f"{name} {url}", daemon=True)
                thread.start()
                self.threads.append(thread)

    def capacity(self) -> int:
        return sum(slot.lanes for slot in self.slots)

    def report(self) -> dict[str, object]:
        """What the claims tell the endpoints of this worker: its kernel and jobs at once."""
        kernels = {slot.kernel for slot in self.slots if slot.kernel}
        kernel = "mixed" if len(kernels) > 1 else (kernels.pop() if kernels else "unknown")
        return {"kernel": kernel, "processes": len(self.slots), "capacity": max(1, self.capacity())}

    def busy(self) -> bool:
        with self.state:
            return bool(self.in_flight) or any(self.finished.values()) or any(self.returned.values())

    def stop(self) -> None:
        """Claim no more, call off waiting claims, give back the jobs in flight, post what is done."""
        self.stopping.set()
        self.end_claims(("stop",))
        for thread in self.threads:
            thread.join()

    def drain(self, deadline: float) -> None:
        """Claim no more and call off waiting claims; finish the jobs that can end by `deadline` (unix
        seconds), give the others back at once, post what is done (a Spot interruption)."""
        self.claims_over.set()  # first: jobs that a claim brings from now on go back, none wait for a lane
        with self.state:
            self.drain_deadline = deadline
            waiting = [key for key, flight in self.in_flight.items() if flight.slot is None]
            self.return_jobs(waiting)
        if waiting:
            log.info("draining: giving back %d job(s) that waited for a lane", len(waiting))
        self.end_claims(("drain", deadline))

    def end_claims(self, message: tuple[object, ...]) -> None:
        """No more claims; the waiting ones broken off (the claimers call them off); `message` to the slots."""
        self.claims_over.set()
        with self.state:
            self.state.notify_all()
            clients = list(self.clients.values())
            for slot in self.slots:
                slot.send(message)
        for client in clients:  # not under the state: an abort may wait for a connect in progress
            client.abort()

    def return_jobs(self, keys: list[tuple[str, str]]) -> None:
        """Jobs no longer computed here, for their endpoints' keepers to give back (with the state held)."""
        for key in keys:
            flight = self.in_flight.pop(key, None)
            if flight is not None:  # not dropped meanwhile
                self.returned[flight.job.endpoint].append(flight.job)
        self.state.notify_all()

    # -- the slots' side -------------------------------------------------------------------

    def slot_ready(self, index: int, kernel: str, lanes: int) -> None:
        with self.state:
            self.slots[index].kernel, self.slots[index].lanes = kernel, lanes
            if self.drain_deadline:  # a slot restarted during a drain gets no jobs; it learns of it anyway
                self.slots[index].send(("drain", self.drain_deadline))
            self.start_waiting()
            self.state.notify_all()

    def job_done(self, key: tuple[str, str], result: str, seconds: float) -> None:
        with self.state:
            flight = self.in_flight.pop(key, None)
            if flight is None:
                return  # cancelled meanwhile
            self.finished[flight.job.endpoint].append(Finished(flight.job, result, seconds))
            self.last_work = time.monotonic()
            per_iteration = seconds / max(1, flight.job.iterations)
            self.iteration_seconds = (per_iteration if self.iteration_seconds is None
                                      else 0.9 * self.iteration_seconds + 0.1 * per_iteration)
            self.start_waiting()
            self.state.notify_all()

    def slots_gave_back(self, keys: list[tuple[str, str]]) -> None:
        """A draining slot stopped jobs that cannot end in time: they go back at once."""
        with self.state:
            self.return_jobs(keys)

    def start_waiting(self) -> None:
        """Jobs that came without a free lane take the lanes free now (with the state held): by turns
        of their endpoints, each one's in the order they came, so that a batch taken early from one
        endpoint does not hold back the jobs of another."""
        while not self.claims_over.is_set():
            heads: dict[str, InFlight] = {}
            for flight in self.in_flight.values():
                if flight.slot is None:
                    heads.setdefault(flight.job.endpoint, flight)
            slot = self.roomiest_slot() if heads else None
            if slot is None:
                return
            flight = min(heads.values(), key=lambda waiting: self.last_turn.get(waiting.job.endpoint, -1))
            self.start_job(flight, slot)

    def start_job(self, flight: InFlight, slot: int) -> None:
        flight.slot, flight.started = slot, time.monotonic()
        self.last_turn[flight.job.endpoint] = next(self.turns)
        self.slots[slot].send(("run", flight.job))

    def slot_lost(self, index: int, pipe: SlotPipe) -> list[Job]:
        """A slot died: its jobs are no longer computed (the caller gives them back)."""
        with self.state:
            lost = [key for key, flight in self.in_flight.items() if flight.slot == index]
            jobs = [self.in_flight.pop(key).job for key in lost]
            self.slots[index] = pipe  # its lanes count again once the new slot is ready
            self.state.notify_all()
        return jobs

    # -- claims ----------------------------------------------------------------------------

    def new_client(self, url: str) -> EndpointClient:
        """A connection of its own for one thread (a simulated fleet, bench/fleet.py, times its requests)."""
        return EndpointClient(url, self.options.worker_key, self.options.worker_id, ca_file=self.options.tls_ca)

    def claim_loop(self, url: str) -> None:
        client = self.new_client(url)
        with self.state:
            self.clients[url] = client
        backoff = Backoff(cap=self.options.max_backoff)
        self.wait_for_slots(SLOTS_READY_WAIT_S)  # so that the first claim reports the whole capacity
        try:
            while not self.claims_over.is_set():
                want = self.reserve(url)
                if want == 0:
                    break
                try:
                    wait = 0.0 if self.claims_over.is_set() else self.options.claim_wait
                    answer = client.claim(want, MAX_CLAIM_BYTES, wait, self.report())
                except ClaimCalledOff:  # the worker filled up meanwhile: what the claim took goes back
                    self.unreserve(url, want)
                    self.call_off(client)
                    client.unanswered_claim = None  # never repeated: a cancelled token takes nothing
                    continue
                except (EndpointDown, Rejected) as exc:
                    self.unreserve(url, want)
                    if self.claims_over.is_set():
                        break
                    wait = backoff.failed()
                    log.warning("%s unavailable, retry in %.1fs: %s", url, wait, exc)
                    self.claims_over.wait(wait)
                    continue
                backoff.succeeded()
                self.unreserve(url, want)
                self.pending_at[url] = answer.pending
                self.run_jobs(client, answer.jobs)
                if not answer.jobs and not answer.waited:
                    self.claims_over.wait(self.options.poll_interval * random.uniform(0.8, 1.2))
        finally:
            self.call_off(client)
            client.close()

    def wait_for_slots(self, timeout: float) -> None:
        """Until every slot said which kernel it runs (a slot that does not start is not waited for
        longer than `timeout`)."""
        deadline = time.monotonic() + timeout
        with self.state:
            while not all(slot.lanes for slot in self.slots) and not self.claims_over.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.state.wait(left)

    def reserve(self, url: str) -> int:
        """Lanes for one claim: this endpoint's share of the free lanes, once there is a free lane. 0: claim
        no more. At least one, so that every endpoint is asked even while another's claim waits for work; but
        not while the claims that hold the free lanes are at endpoints that said they have work
        pending (those claims come back with jobs at once, and a second claim's jobs would be given
        back)."""
        with self.state:
            while not self.claims_over.is_set():
                free = self.capacity() + self.prefetch(url) - len(self.in_flight)
                others = {other: count for other, count in self.reserved.items() if other != url and count}
                room = free - sum(others.values())
                if free > 0 and (room > 0 or not any(self.pending_at.get(other) for other in others)):
                    share = -(-free // len(self.options.endpoints))
                    want = min(MAX_CLAIM_JOBS, max(1, min(share, room)))
                    self.reserved[url] += want
                    return want
                self.state.wait()
        return 0

    def prefetch(self, url: str) -> int:
        """Jobs taken beyond the free lanes, to wait in the worker for the next free lane: only while
        `url` said more are pending, and only as many as the lanes finish within PREFETCH_HORIZON_S,
        if its next jobs are as long as its last one. Short jobs then come many to a claim (a claim
        per job costs more than the job); a long job is never held back from a worker that could
        start it sooner (and one that comes all the same is given back, see may_wait())."""
        last = self.estimate(self.last_iterations.get(url, 0))
        if not self.pending_at.get(url) or last is None:
            return 0
        return min(MAX_CLAIM_JOBS, int(self.capacity() * PREFETCH_HORIZON_S / max(last, 1e-6)))

    def estimate(self, iterations: int) -> float | None:
        """Seconds in a lane for a job of `iterations`, from the jobs done so far (None: none done yet)."""
        if self.iteration_seconds is None or iterations <= 0:
            return None
        return iterations * self.iteration_seconds

    def waiting_work(self) -> float:
        """Lane-seconds of the jobs waiting for a lane (with the state held)."""
        return sum(self.estimate(flight.job.iterations) or 0.0 for flight in self.in_flight.values()
                   if flight.slot is None)

    def unreserve(self, url: str, count: int) -> None:
        with self.state:
            self.reserved[url] -= count
            self.state.notify_all()  # a claimer that waited for this claim's answer looks again

    def run_jobs(self, client: EndpointClient, jobs: list[Job]) -> None:
        """Into the slots with the most free lanes. A job with no free lane waits for the next, its
        lease kept, only if the lanes finish the jobs waiting within PREFETCH_HORIZON_S (short jobs,
        taken early on purpose); any other (claims at both endpoints came back at once, each with a
        job for the last free lane) is given back at once, its attempt not counted, so that an idle
        worker takes it. Jobs that came while stopping or draining are given back at once too."""
        surplus: list[Job] = []
        with self.state:
            if self.claims_over.is_set():
                surplus, jobs = jobs, []
            if jobs:
                self.last_iterations[client.base_url] = jobs[-1].iterations
            waiting = self.waiting_work()
            for job in jobs:
                slot = self.roomiest_slot()
                if slot is None:
                    length = self.estimate(job.iterations)
                    if length is None or waiting + length > self.capacity() * PREFETCH_HORIZON_S:
                        surplus.append(job)
                        continue
                    waiting += length
                flight = self.in_flight[job.key] = InFlight(job, None)
                if slot is not None:
                    self.start_job(flight, slot)
            if len(surplus) < len(jobs):
                self.last_work = time.monotonic()
                self.state.notify_all()  # the keeper learns when their first renewal is due
            calling_off = self.claims_to_call_off(client.base_url)
        for other in calling_off:  # not under the state: it may wait for a connect in progress
            other.call_off_claim()
        if surplus:
            log.info("giving back %d job(s) from %s: %s", len(surplus), client.base_url,
                     "no lane free for them" if not self.claims_over.is_set()
                     else "draining" if self.drain_deadline and not self.stopping.is_set() else "stopping")
            self.give_back(client, surplus)

    def claims_to_call_off(self, url: str) -> list[EndpointClient]:
        """The claimers' clients at other endpoints than `url` whose claims are out, if no lane is free
        nor frees within CALL_OFF_AFTER_S as far as the estimates tell (with the state held): a claim
        woken there would wake a worker that cannot take the work, and the wake would be spent."""
        if self.claims_over.is_set() or len(self.in_flight) < self.capacity():
            return []
        now = time.monotonic()
        for flight in self.in_flight.values():
            length = self.estimate(flight.job.iterations)
            if flight.slot is None or (length is not None and flight.started + length - now < CALL_OFF_AFTER_S):
                return []  # short jobs: a lane frees soon, and its claimer claims again then
        return [client for other, client in self.clients.items() if other != url and self.reserved[other]]

    def roomiest_slot(self) -> int | None:
        load = [0] * len(self.slots)
        for flight in self.in_flight.values():
            if flight.slot is not None:
                load[flight.slot] += 1
        room = [slot.lanes - load[index] for index, slot in enumerate(self.slots)]
        best = max(range(len(room)), key=room.__getitem__)
        return best if room[best] > 0 else None

    def call_off(self, client: EndpointClient) -> None:
        """A claim broken off by a stop or a drain: the endpoint ends it and gives back what it took."""
        if client.unanswered_claim is None:
            return
        client.resume()
        try:
            released = client.cancel_unanswered()
            if released:
                log.info("%s: the claim broken off had taken %d job(s): given back",
                         client.base_url, released)
        except (EndpointDown, Rejected) as exc:
            log.warning("%s: could not call off the waiting claim: %s", client.base_url, exc)

    def give_back(self, client: EndpointClient, jobs: list[Job]) -> None:
        """Release jobs at once, trying for a little while if the endpoint does not answer (it may be
        restarting): a lease left to expire would count as a failed attempt."""
        backoff = Backoff(first=0.2, cap=2.0)
        give_up_at = time.monotonic() + GIVE_BACK_PATIENCE_S
        for start in range(0, len(jobs), MAX_ITEMS_PER_REQUEST):
            batch = jobs[start:start + MAX_ITEMS_PER_REQUEST]
            while True:
                try:
                    client.release(batch)
                    break
                except Rejected as exc:
                    log.info("could not give back %d job(s) to %s: %s", len(batch), client.base_url, exc)
                    break
                except EndpointDown as exc:
                    wait = backoff.failed()
                    if time.monotonic() + wait > give_up_at:
                        log.info("could not give back %d job(s) to %s (their leases will expire): %s",
                                 len(batch), client.base_url, exc)
                        return
                    time.sleep(wait)

    # -- leases and results ----------------------------------------------------------------

    def keep_loop(self, url: str) -> None:
        client = self.new_client(url)
        keeper = _Keeper(self, client)
        try:
            while not self.stopping.is_set():
                keeper.round()
            keeper.finish()
        finally:
            client.close()

    def results_due(self, url: str) -> float:
        """When the results waiting for `url` are to be posted: RESULTS_LINGER_S after the first of
        them, so that results finishing together go in one request; at once when there are many.
        inf: there are none."""
        with self.state:
            waiting = self.finished[url]
            if not waiting:
                return float("inf")
            return 0.0 if len(waiting) >= RESULTS_ENOUGH else waiting[0].since + RESULTS_LINGER_S

    def take_finished(self, url: str) -> list[Finished]:
        with self.state:
            batch = self.finished[url][:MAX_ITEMS_PER_REQUEST]
            del self.finished[url][:len(batch)]
            return batch

    def put_back_finished(self, url: str, batch: list[Finished]) -> None:
        with self.state:
            self.finished[url][:0] = batch

    def leases_at(self, url: str) -> list[InFlight]:
        with self.state:
            return [flight for flight in self.in_flight.values() if flight.job.endpoint == url and flight.renewing]

    def drop(self, job: Job) -> None:
        """The job is no longer ours (completed, or leased to another attempt): its lane stops."""
        with self.state:
            flight = self.in_flight.pop(job.key, None)
            if flight is not None:
                if flight.slot is not None:
                    self.slots[flight.slot].send(("cancel", job.key))
                self.start_waiting()
                self.state.notify_all()

    def take_in_flight(self, url: str) -> list[Job]:
        """At a stop: the jobs still computing for `url`, to give back."""
        with self.state:
            keys = [key for key, flight in self.in_flight.items() if flight.job.endpoint == url]
            return [self.in_flight.pop(key).job for key in keys]

    def take_returned(self, url: str) -> list[Job]:
        with self.state:
            jobs, self.returned[url] = self.returned[url], []
            return jobs

    def wait_for_news(self, url: str, timeout: float, results_wait: bool) -> None:
        """Up to `timeout`, or until something changes; at once if results wait to be posted (unless
        `results_wait`: they wait for a back-off) or jobs to be given back."""
        with self.state:
            if (results_wait or not self.finished[url]) and not self.returned[url] and not self.stopping.is_set():
                self.state.wait(timeout)


class _Keeper:
    """One endpoint's results and renewals, from its keeper thread."""

    def __init__(self, dispatcher: Dispatcher, client: EndpointClient) -> None:
        self.dispatcher = dispatcher
        self.client = client
        self.url = client.base_url
        self.submit_backoff = Backoff(first=0.2, cap=dispatcher.options.max_backoff)
        self.renew_backoff = Backoff(first=0.5, cap=10.0)  # its cap follows the lease (renew())

    def round(self) -> None:
        returned = self.dispatcher.take_returned(self.url)
        if returned:
            self.dispatcher.give_back(self.client, returned)
        post_at = max(self.submit_backoff.next_try(), self.dispatcher.results_due(self.url))
        if post_at <= time.monotonic():
            self.submit_finished(self.dispatcher.options.submit_patience)
            post_at = float("inf")
        flights = self.dispatcher.leases_at(self.url)
        renew_at = min((flight.renew_at for flight in flights), default=float("inf"))
        if renew_at <= time.monotonic():
            self.renew(flights)
            return
        holding = post_at != float("inf")  # results wait (a back-off, or for more to come along)
        wake_at = min(renew_at, post_at)
        self.dispatcher.wait_for_news(self.url, max(0.0, min(wake_at - time.monotonic(), 1.0)), holding)

    def submit_finished(self, patience: float) -> None:
        while True:
            batch = self.dispatcher.take_finished(self.url)
            if not batch:
                return
            try:
                answers = self.client.submit([(done.job, done.result, done.seconds) for done in batch])
            except EndpointDown as exc:
                kept = [done for done in batch if time.monotonic() - done.since < patience]
                if len(kept) < len(batch):
                    log.error("giving up on %d result(s) for %s: %s (the endpoint will run the items again)",
                              len(batch) - len(kept), self.url, exc)
                self.dispatcher.put_back_finished(self.url, kept)
                log.warning("results for %s not accepted, retry in %.1fs: %s", self.url, self.submit_backoff.failed(),
                            exc)
                return
            except Rejected as exc:
                log.error("%d result(s) refused by %s: %s", len(batch), self.url, exc)
                continue
            self.submit_backoff.succeeded()
            for done, answer in zip(batch, answers):  # noqa: B905 -- strict= needs 3.10; the client checked lengths
                if answer == ALREADY_COMPLETED:
                    log.info("%s already had a result; ours was dropped", done.job.work_id)
                elif answer != STORED:
                    log.error("result for %s refused: %s", done.job.work_id, answer)

    def renew(self, flights: list[InFlight]) -> None:
        """Every lease held here, in one request (the rest of more than a batch at once after)."""
        flights = flights[:MAX_ITEMS_PER_REQUEST]
        period = min(flight.job.lease_seconds for flight in flights) / 3
        try:
            answers = self.client.renew([flight.job for flight in flights])
        except (EndpointDown, Rejected) as exc:
            # Keep computing: the results are still accepted if the endpoint comes back. Again soon,
            # with back-off, never slower than a third of the lease.
            wait = min(self.renew_backoff.failed(), period)
            log.warning("renewing %d lease(s) at %s failed, retry in %.1fs: %s", len(flights), self.url, wait, exc)
            for flight in flights:
                flight.renew_at = time.monotonic() + wait
            return
        self.renew_backoff.succeeded()
        for flight, answer in zip(flights, answers):  # noqa: B905 -- strict= needs 3.10; the client checked lengths
            flight.renew_at = time.monotonic() + flight.job.lease_seconds / 3
            self.lease_answer(flight, answer)

    def lease_answer(self, flight: InFlight, answer: str) -> None:
        if answer == LEASE_HELD:
            return
        if answer == NOT_LEASED:
            log.info("lease on %s expired; finishing it anyway, the result still counts", flight.job.work_id)
            flight.renewing = False
        else:  # MOVED_ON, or the endpoint no longer knows it
            log.info("%s is %s, abandoning it", flight.job.work_id, answer.replace("_", " "))
            self.dispatcher.drop(flight.job)

    def finish(self) -> None:
        """At a stop: the jobs still computing go back, then what is done is posted (briefly)."""
        jobs = self.dispatcher.take_returned(self.url) + self.dispatcher.take_in_flight(self.url)
        if jobs:
            self.dispatcher.give_back(self.client, jobs)
        deadline = time.monotonic() + GIVE_BACK_PATIENCE_S
        while time.monotonic() < deadline:
            self.submit_finished(patience=0.0 if time.monotonic() >= deadline else GIVE_BACK_PATIENCE_S)
            with self.dispatcher.state:
                if not self.dispatcher.finished[self.url]:
                    return
            time.sleep(min(1.0, max(0.0, self.submit_backoff.next_try() - time.monotonic())))

