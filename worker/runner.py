"""A worker: one supervisor process and one slot process per core.

Each slot claims jobs from the endpoints in turn, computes them while a thread renews the
lease, and posts the result to the endpoint that owns the item. The supervisor watches the
slots, ends the worker when no endpoint has had work for `idle_timeout` seconds, and then
runs the exit action (on EC2 a shutdown, which terminates the instance).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event
from types import FrameType

from worker.client import HTTP_TIMEOUT_S, LEASE_HELD, MOVED_ON, EndpointClient, EndpointDown, Job, Rejected
from worker.hashing import CHECK_EVERY, work
from worker.interruption import Drain, Metadata, Notice, Progress, Watcher, announce

log = logging.getLogger("worker")

# A stopping slot keeps offering its job back (or its result) this long to an endpoint that
# does not answer -- one being restarted, say -- so that the lease need not expire and count.
GIVE_BACK_PATIENCE_S = 10.0
# How long a stopping supervisor waits for its slots: a claim in flight, then giving the job back.
SLOT_STOP_GRACE_S = HTTP_TIMEOUT_S + GIVE_BACK_PATIENCE_S + HTTP_TIMEOUT_S + 5.0


@dataclass(frozen=True)
class WorkerOptions:
    endpoints: tuple[str, ...]
    worker_key: str  # the worker key (endpoint/secret.py), never the cluster secret
    worker_id: str
    processes: int
    idle_timeout: float
    poll_interval: float = 0.5
    exit_command: str = ""
    max_backoff: float = 30.0
    # How long a finished result is offered to its endpoint before it is given up on; by then
    # the endpoint has long re-leased the item, and a worker stuck on a dead endpoint would
    # never go idle (and never stop costing money).
    submit_patience: float = 3600.0
    interruption_notices: str = "off"  # ec2-spot: watch for a Spot interruption notice (worker/interruption.py)
    metadata_url: str = "http://169.254.169.254"
    notice_interval: float = 5.0


class Backoff:
    """When to try an endpoint again after it failed: doubling delays with jitter."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self._first, self._cap = first, cap
        self._delay = 0.0
        self._next_try = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self._next_try

    def failed(self) -> float:
        self._delay = min(self._cap, self._delay * 2 if self._delay else self._first)
        wait = self._delay * random.uniform(0.5, 1.0)
        self._next_try = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self._delay = 0.0
        self._next_try = 0.0


class _Slot:
    """The loop of one slot process."""

    def __init__(self, index: int, options: WorkerOptions, stop: Event, busy: SynchronizedArray,
                 last_work: SynchronizedArray, drain: Drain) -> None:
        self.index = index
        self.drain = drain
        self.options = options
        self.stop = stop
        self.busy = busy
        self.last_work = last_work
        self.parent_pid = os.getppid()
        self.clients = [EndpointClient(url, options.worker_key, options.worker_id) for url in options.endpoints]
        self.backoffs = [Backoff(cap=options.max_backoff) for _ in options.endpoints]
        self.next_endpoint = index % len(self.clients)  # slots start on different endpoints

    def should_stop(self) -> bool:
        # A slot whose supervisor died (SIGKILL) must not keep computing unobserved.
        return self.stop.is_set() or os.getppid() != self.parent_pid

    def run(self) -> None:
        while not self.should_stop():
            claimed = None if self.drain.active() else self.claim_next()  # INTERRUPTION HOOK: no claims
            if claimed is None:
                self.stop.wait(self.options.poll_interval * random.uniform(0.8, 1.2))
                continue
            client, job = claimed
            self.last_work[self.index] = time.monotonic()
            try:
                self.process(client, job)
            finally:
                self.last_work[self.index] = time.monotonic()
                self.busy[self.index] = 0

    def claim_next(self) -> tuple[EndpointClient, Job] | None:
        """Ask the endpoints in turn, starting after the one that gave the last job. The slot counts
        as busy from the moment a claim starts: no idle exit may begin while a job may be on its way."""
        count = len(self.clients)
        for offset in range(count):
            position = (self.next_endpoint + offset) % count
            client, backoff = self.clients[position], self.backoffs[position]
            if not backoff.ready():
                continue
            self.busy[self.index] = 1
            try:
                job = client.claim()
            except (EndpointDown, Rejected) as exc:
                self.busy[self.index] = 0
                log.warning("slot %d: %s unavailable, retry in %.1fs: %s",
                            self.index, client.base_url, backoff.failed(), exc)
                continue
            backoff.succeeded()
            if job is not None:
                self.next_endpoint = (position + 1) % count
                return client, job  # still busy: run() clears it when the job is done
            self.busy[self.index] = 0
        return None

    def process(self, client: EndpointClient, job: Job) -> None:
        lease_lost = threading.Event()
        done = threading.Event()
        renewer = threading.Thread(target=self.keep_lease, args=(job, lease_lost, done), daemon=True)
        renewer.start()
        started = time.perf_counter()
        # INTERRUPTION HOOK: once a Spot notice came, a job that cannot end in time goes back.
        progress = Progress(job.iterations, CHECK_EVERY)

        def cancelled() -> bool:
            progress.advanced()
            return lease_lost.is_set() or self.should_stop() or self.drain.gives_up(progress)

        try:
            result = work(job.payload, job.iterations, cancelled)
        finally:
            done.set()
            renewer.join()
        duration = time.perf_counter() - started
        if result is None:
            if not lease_lost.is_set():
                if self.drain.active():
                    log.info("slot %d: giving %s back: it cannot finish before the interruption", self.index,
                             job.work_id)
                self.give_back(client, job)
            return
        self.submit(client, job, result, duration)

    def keep_lease(self, job: Job, lease_lost: threading.Event, done: threading.Event) -> None:
        """Renew every third of the lease; after a failed renewal, again soon (with back-off, never
        slower than a third of the lease), so that one lost answer does not cost the lease. Only a
        job completed or leased to another attempt is abandoned: when the lease merely expired,
        the result still counts, so the job goes on (and renewing stops)."""
        # Its own connection: the slot's is not thread-safe.
        client = EndpointClient(job.endpoint, self.options.worker_key, self.options.worker_id)
        period = job.lease_seconds / 3
        backoff = Backoff(first=min(0.5, period), cap=period)
        wait = period
        try:
            while not done.wait(wait):
                try:
                    answer = client.renew(job)
                except (EndpointDown, Rejected) as exc:
                    # Keep computing: the result is still accepted if the endpoint comes back.
                    wait = backoff.failed()
                    log.warning("slot %d: renewing %s failed, retry in %.1fs: %s", self.index, job.work_id, wait, exc)
                    continue
                backoff.succeeded()
                wait = period
                if answer == LEASE_HELD:
                    continue
                if answer in MOVED_ON:
                    log.info("slot %d: %s is %s, abandoning it", self.index, job.work_id, answer.replace("_", " "))
                    lease_lost.set()
                else:
                    log.info("slot %d: lease on %s expired; finishing it anyway, the result still counts",
                             self.index, job.work_id)
                return
        finally:
            client.close()

    def give_back(self, client: EndpointClient, job: Job) -> None:
        """Release the job at once, trying for a little while if the endpoint does not answer (it may
        be restarting): a lease left to expire would count as a failed attempt."""
        backoff = Backoff(first=0.2, cap=2.0)
        give_up_at = time.monotonic() + GIVE_BACK_PATIENCE_S
        while True:
            try:
                client.release(job)
                return
            except Rejected as exc:
                log.info("slot %d: could not release %s: %s", self.index, job.work_id, exc)
                return
            except EndpointDown as exc:
                wait = backoff.failed()
                if time.monotonic() + wait > give_up_at:
                    log.info("slot %d: could not release %s (its lease will expire): %s",
                             self.index, job.work_id, exc)
                    return
                time.sleep(wait)  # not stop.wait(): stop is already set

    def submit(self, client: EndpointClient, job: Job, result: str, duration: float) -> None:
        """Post the result to the owning endpoint until it is accepted (or patience runs out)."""
        backoff = Backoff(first=0.2, cap=self.options.max_backoff)
        give_up_at = time.monotonic() + self.options.submit_patience
        while True:
            try:
                stored = client.submit(job, result, duration)
            except EndpointDown as exc:
                if self.should_stop():  # a stopping slot tries only briefly
                    give_up_at = min(give_up_at, time.monotonic() + GIVE_BACK_PATIENCE_S)
                wait = backoff.failed()
                if time.monotonic() + wait > give_up_at:
                    log.error("slot %d: giving up on the result for %s: %s (the endpoint will run the item again)",
                              self.index, job.work_id, exc)
                    return
                log.warning("slot %d: result for %s not accepted, retry in %.1fs: %s",
                            self.index, job.work_id, wait, exc)
                if self.should_stop():
                    time.sleep(wait)
                else:
                    self.stop.wait(wait)
                continue
            except Rejected as exc:
                log.error("slot %d: result for %s refused: %s", self.index, job.work_id, exc)
                return
            if not stored:
                log.info("slot %d: %s already had a result; ours was dropped", self.index, job.work_id)
            return


def _run_slot(index: int, options: WorkerOptions, stop: Event, busy: SynchronizedArray,
              last_work: SynchronizedArray, drain: Drain, log_level: int) -> None:
    # Ctrl-C and a group-wide SIGTERM reach every process; the supervisor alone decides
    # when slots stop (and a slot whose supervisor died notices by itself).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker[{index}]: %(message)s")
    _Slot(index, options, stop, busy, last_work, drain).run()


def run_worker(options: WorkerOptions) -> int:
    """Run until idle or told to stop. Returns the exit status: 0 after an idle exit, 128 +
    the signal number when stopped, so that a service manager can tell the two apart (on EC2
    only the idle exit powers the instance off)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    busy = context.Array("b", options.processes)
    # Monotonic (system-wide on Linux, so comparable between processes): a clock step at boot
    # must not end a worker early or keep it past its idle timeout.
    last_work = context.Array("d", [time.monotonic()] * options.processes)
    log_level = logging.getLogger().getEffectiveLevel()
    drain = Drain(context.Value("d", 0.0))  # INTERRUPTION HOOK: set by a Spot notice
    notices = watch_for_interruption(options, drain)

    def start_slot(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_run_slot, args=(index, options, stop, busy, last_work, drain, log_level),
            name=f"slot-{index}", daemon=True,
        )
        process.start()
        return process

    signalled: list[int] = []

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        # Only a plain flag here: Event.set() from a signal handler can deadlock with
        # an Event.wait() the interrupted code is in.
        signalled.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    slots = [start_slot(index) for index in range(options.processes)]
    log.info("worker %s: %d slots on %s", options.worker_id, options.processes, ", ".join(options.endpoints))
    status = 0
    while True:
        time.sleep(0.25)
        if signalled:
            log.info("signal %d: stopping", signalled[0])
            status = 128 + signalled[0]
            break
        for index, process in enumerate(slots):
            if not process.is_alive():
                log.error("slot %d exited with code %s; restarting it", index, process.exitcode)
                busy[index] = 0
                slots[index] = start_slot(index)
        finished = why_finished(options, busy, last_work, drain)
        if finished:
            log.info("%s: exiting", finished)
            break
    stop.set()
    # Slots finish what they hold first: a claim in flight, then giving the job back.
    deadline = time.monotonic() + SLOT_STOP_GRACE_S
    for process in slots:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("slot %s did not stop within %.0fs: killing it", process.name, SLOT_STOP_GRACE_S)
            process.kill()
    if notices:  # INTERRUPTION HOOK: the scalers may terminate the instance now
        announce(options.endpoints, options.worker_key, options.worker_id, notices[0], left=True)
    if status == 0 and options.exit_command:
        run_exit_command(options.exit_command)
    return status


def why_finished(options: WorkerOptions, busy: SynchronizedArray, last_work: SynchronizedArray,
                 drain: Drain) -> str:
    """Why the worker is done ("": it is not): idle long enough, or interrupted and all slots done."""
    if any(busy[:]):
        return ""
    if drain.active():  # INTERRUPTION HOOK
        return "interrupted: what could finish is posted, the rest given back"
    idle_for = time.monotonic() - max(last_work[:])
    return f"no work from any endpoint for {idle_for:.0f}s" if idle_for >= options.idle_timeout else ""


def watch_for_interruption(options: WorkerOptions, drain: Drain) -> list[Notice]:
    """On a Spot instance: a thread that starts the drain at the notice (and tells the endpoints);
    the list holds the notice once it came."""
    notices: list[Notice] = []
    if options.interruption_notices != "ec2-spot":
        return notices

    def on_notice(notice: Notice) -> None:
        drain.begin(notice)
        notices.append(notice)
        announce(options.endpoints, options.worker_key, options.worker_id, notice, left=False)

    Watcher(Metadata(options.metadata_url), options.notice_interval, on_notice, threading.Event()).start()
    return notices


def run_exit_command(command: str) -> None:
    log.info("running exit command: %s", command)
    try:
        subprocess.run(shlex.split(command), check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("exit command failed: %s", exc)
