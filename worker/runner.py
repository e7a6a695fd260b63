"""A worker: one supervisor process and one slot process per core.

The supervisor claims jobs for all its slots (worker/dispatch.py: one claimer and one keeper
thread per endpoint, batched claims, renewals and results), hands them to the slots
(worker/slot.py: the hashing kernel, one job per lane), ends the worker when no endpoint has had
work for `idle_timeout` seconds, and then runs the exit action (on EC2 a shutdown, which
terminates the instance).
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
    claim_wait: float = 20.0  # how long a claim waits at the endpoint for work
    tls_ca: str = ""  # the CA https endpoints are checked against ("": the system's)


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
    status = supervise(options, slots, processes, dispatcher, signalled)
    dispatcher.stop()  # claims called off, jobs given back, results posted: the slots are told to stop
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("slot %s did not stop: killing it", process.name)
            process.kill()
    if status == 0 and options.exit_command:
        run_exit_command(options.exit_command)
    return status


def supervise(options: WorkerOptions, slots: _Slots, processes: list[BaseProcess], dispatcher: Dispatcher,
              signalled: list[int]) -> int:
    """Until a signal (128 + its number) or the idle timeout (0); restarts slots that died."""
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
        idle_for = time.monotonic() - dispatcher.last_work
        if not dispatcher.busy() and idle_for >= options.idle_timeout:
            log.info("no work from any endpoint for %.0fs: exiting", idle_for)
            return 0


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
