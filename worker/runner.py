"""A worker: one supervisor process and one slot process per core.

The supervisor claims jobs for all its slots (worker/dispatch.py: one claimer and one keeper
thread per endpoint, batched claims, renewals and results), hands them to the slots
(worker/slot.py: the hashing kernel, one job per lane), ends the worker when no endpoint has had
work for `idle_timeout` seconds, and then runs the exit action (on EC2 a shutdown, which
terminates the instance). On a Spot instance it watches for the interruption notice
(worker/interruption.py) and drains at once: the worker ends, and runs its exit action, once what
could finish is posted and the rest given back, or at the drain's deadline.
"""

from __future__ import annotations

import logging
import multiprocessing
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from worker.client import HTTP_TIMEOUT_S, EndpointClient
from worker.dispatch import GIVE_BACK_PATIENCE_S, Dispatcher, DispatchOptions, SlotPipe
from worker.interruption import MARGIN_S, Metadata, Notice, Watcher, announce
from worker.slot import run_slot

log = logging.getLogger("worker")

# How long a stopping supervisor waits for its threads: calling off a claim, giving the jobs back,
# posting the results done, each against an endpoint that may not answer at first.
STOP_GRACE_S = 3 * (HTTP_TIMEOUT_S + GIVE_BACK_PATIENCE_S) + 5.0


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
    kernel: str = "auto"  # worker/native.py's choices
    kernel_library: str = ""  # default: sha512_lanes.so beside native.py
    claim_wait: float = 30.0  # how long a claim waits at the endpoint for work
    tls_ca: str = ""  # the CA https endpoints are checked against ("": the system's)
    interruption_notices: str = "off"  # ec2-spot: watch for a Spot interruption notice (worker/interruption.py)
    metadata_url: str = "http://169.254.169.254"
    notice_interval: float = 5.0


class _Slots:
    """The slot processes and the thread that reads what they send."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.context = multiprocessing.get_context("spawn")
        self.log_level = logging.getLogger().getEffectiveLevel()
        self.processes: list[BaseProcess] = []
        self.pipes: list[SlotPipe] = []
        self.dispatcher: Dispatcher | None = None

    def start(self, index: int) -> tuple[BaseProcess, SlotPipe]:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=run_slot, args=(index, theirs, self.options.kernel, self.options.kernel_library, self.log_level,
                                   self.options.worker_key, self.options.worker_id, self.options.tls_ca),
            name=f"slot-{index}", daemon=True)
        process.start()
        theirs.close()
        return process, SlotPipe(ours)

    def read_forever(self) -> None:
        assert self.dispatcher is not None
        while True:
            conns = {pipe.conn: index for index, pipe in enumerate(self.dispatcher.slots) if not pipe.conn.closed}
            for conn in wait(list(conns), timeout=0.25):
                index = conns[conn]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    conn.close()  # type: ignore[union-attr]  # the slot died: the supervisor restarts it
                    continue
                self.handle(index, message)

    def handle(self, index: int, message: tuple[object, ...]) -> None:
        assert self.dispatcher is not None
        if message[0] == "done":
            _, key, result, seconds = message
            self.dispatcher.job_done(key, str(result), float(seconds))  # type: ignore[arg-type]
        elif message[0] == "give_back":
            self.dispatcher.slots_gave_back(list(message[1]))  # type: ignore[call-overload]
        elif message[0] == "ready":
            _, kernel, lanes, _reason = message
            self.dispatcher.slot_ready(index, str(kernel), int(lanes))  # type: ignore[call-overload]


def run_worker(options: WorkerOptions) -> int:
    """Run until idle or told to stop. Returns the exit status: 0 after an idle exit, 128 +
    the signal number when stopped, so that a service manager can tell the two apart (on EC2
    only the idle exit powers the instance off)."""
    signalled: list[int] = []

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        # Only a plain flag here: Event.set() from a signal handler can deadlock with
        # an Event.wait() the interrupted code is in.
        signalled.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    slots = _Slots(options)
    started = [slots.start(index) for index in range(options.processes)]
    processes = [process for process, _ in started]
    dispatcher = Dispatcher(DispatchOptions(options.endpoints, options.worker_key, options.worker_id,
                                            options.claim_wait, options.poll_interval, options.max_backoff,
                                            options.submit_patience, options.tls_ca), [pipe for _, pipe in started])
    slots.dispatcher = dispatcher
    threading.Thread(target=slots.read_forever, name="slots", daemon=True).start()
    dispatcher.start()
    log.info("worker %s: %d slots on %s", options.worker_id, options.processes, ", ".join(options.endpoints))
    notices = watch_for_interruption(options, dispatcher)
    status = supervise(options, slots, processes, dispatcher, signalled)
    dispatcher.stop()  # claims called off, jobs given back, results posted: the slots are told to stop
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("slot %s did not stop: killing it", process.name)
            process.kill()
    if notices:  # the scalers may terminate the instance now
        announce(options.endpoints, options.worker_key, options.worker_id, notices[0], left=True,
                 ca_file=options.tls_ca)
    if status == 0 and options.exit_command:
        run_exit_command(options.exit_command)
    return status


def supervise(options: WorkerOptions, slots: _Slots, processes: list[BaseProcess], dispatcher: Dispatcher,
              signalled: list[int]) -> int:
    """Until a signal (128 + its number), the idle timeout or the end of a drain (0); restarts slots
    that died."""
    reported = False
    while True:
        time.sleep(0.25)
        if signalled:
            log.info("signal %d: stopping", signalled[0])
            return 128 + signalled[0]
        if not reported and dispatcher.capacity() and all(pipe.lanes for pipe in dispatcher.slots):
            reported = True
            log.info("worker %s: %s", options.worker_id, dispatcher.report())
        for index, process in enumerate(processes):
            if not process.is_alive():
                log.error("slot %d exited with code %s; restarting it", index, process.exitcode)
                processes[index], pipe = slots.start(index)
                give_back_lost(options, dispatcher, dispatcher.slot_lost(index, pipe))
        finished = why_finished(options, dispatcher)
        if finished:
            log.info("%s: exiting", finished)
            return 0


def why_finished(options: WorkerOptions, dispatcher: Dispatcher) -> str:
    """Why the worker is done ("": it is not): idle long enough, or drained (or out of time to drain)."""
    if dispatcher.drain_deadline and time.time() >= dispatcher.drain_deadline:
        return "interrupted, and out of time: what is still computing goes back"
    if dispatcher.busy():
        return ""
    if dispatcher.drain_deadline:
        return "interrupted: what could finish is posted, the rest given back"
    idle_for = time.monotonic() - dispatcher.last_work
    return f"no work from any endpoint for {idle_for:.0f}s" if idle_for >= options.idle_timeout else ""


def watch_for_interruption(options: WorkerOptions, dispatcher: Dispatcher) -> list[Notice]:
    """On a Spot instance: a thread that drains the worker at the notice (and tells the endpoints);
    the list holds the notice once it came."""
    notices: list[Notice] = []
    if options.interruption_notices != "ec2-spot":
        return notices

    def on_notice(notice: Notice) -> None:
        notices.append(notice)  # first: the worker may be done draining at once
        dispatcher.drain(notice.deadline - MARGIN_S)
        announce(options.endpoints, options.worker_key, options.worker_id, notice, left=False, ca_file=options.tls_ca)

    Watcher(Metadata(options.metadata_url), options.notice_interval, on_notice, threading.Event()).start()
    return notices


def give_back_lost(options: WorkerOptions, dispatcher: Dispatcher, jobs: list) -> None:
    for url in options.endpoints:
        lost = [job for job in jobs if job.endpoint == url]
        if lost:
            client = EndpointClient(url, options.worker_key, options.worker_id, ca_file=options.tls_ca)
            dispatcher.give_back(client, lost)
            client.close()


def run_exit_command(command: str) -> None:
    log.info("running exit command: %s", command)
    try:
        subprocess.run(shlex.split(command), check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("exit command failed: %s", exc)
