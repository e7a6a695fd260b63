"""A slot: one process that hashes the jobs its supervisor hands it, one job per lane of its kernel.

The slot gets ("run", job) and ("cancel", key) over a pipe and answers ("done", key,
result, seconds); it talks to an endpoint only when its supervisor died (SIGKILL), to give back
the jobs it held, which nobody else would. A lane whose chain ends takes the next
job at once, so jobs of different lengths share the vector; with one job alone the slot runs
the scalar kernel, faster for a single chain than one lane of a vector (worker/native.py).
Between kernel calls (a few milliseconds each; ctypes releases the GIL meanwhile) it reads its
pipe, so a cancelled job stops within one call.

After ("drain", deadline) -- a Spot interruption notice -- the slot looks every JUDGE_EVERY_S
at how long each of its jobs still needs at its speed so far, stops those that cannot end by
the deadline (or whose speed is not known yet) and sends ("give_back", [keys]) for the
supervisor to release them at once; the others run to the end.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from worker.client import EndpointClient, EndpointDown, Job, Rejected
from worker.interruption import can_finish, seconds_to_go
from worker.native import CHECK_EVERY, Kernel, Lanes, select_kernel

log = logging.getLogger("worker")

IDLE_POLL_S = 0.5  # an idle slot looks this often whether its supervisor is still there
JUDGE_EVERY_S = 0.2  # while draining: how often the jobs' time to go is weighed against the deadline


def slot_kernels(choice: str, library: str) -> tuple[Kernel, Kernel | None]:
    """The slot's kernel for its lanes, and the one for a job alone (None: the same)."""
    kernel = select_kernel(choice, library or None)
    if choice != "auto" or kernel.lanes == 1:
        return kernel, None
    single = select_kernel("scalar", library or None)
    return kernel, (single if single.native else None)


class Slot:
    def __init__(self, conn: Connection, kernel: Kernel, single: Kernel | None, parent_pid: int) -> None:
        self.conn = conn
        self.lanes: Lanes[Any] = Lanes(kernel, single=single)
        self.started: dict[Any, float] = {}
        self.jobs: dict[Any, Job] = {}
        self.parent_pid = parent_pid
        self.drain_deadline = 0.0  # unix seconds; 0 while there is no drain
        self.judged_at = -float("inf")  # monotonic

    def run(self) -> list[Job]:
        """Until told to stop (returns nothing), or until the supervisor died: returns the jobs held."""
        while os.getppid() == self.parent_pid:  # a slot whose supervisor died must not keep computing
            idle = self.lanes.busy() == 0
            try:
                if not self.read_messages(IDLE_POLL_S if idle else 0.0):
                    return []
            except (EOFError, OSError):
                break  # the supervisor is gone
            for key, result in self.lanes.step(CHECK_EVERY, stop_on_finish=True):
                self.jobs.pop(key, None)
                self.conn.send(("done", key, result, time.perf_counter() - self.started.pop(key)))
            if self.drain_deadline and time.monotonic() - self.judged_at >= JUDGE_EVERY_S:
                self.give_back_late()
        return list(self.jobs.values())

    def read_messages(self, timeout: float) -> bool:
        """Every message waiting (the first up to `timeout`); False when told to stop."""
        while self.conn.poll(timeout):
            timeout = 0.0
            message = self.conn.recv()
            if message[0] == "stop":
                return False
            if message[0] == "run":
                job: Job = message[1]
                self.started[job.key] = time.perf_counter()
                self.jobs[job.key] = job
                self.lanes.submit(job.key, job.payload, job.iterations)
            elif message[0] == "cancel":
                self.drop(message[1])
            elif message[0] == "drain":
                self.drain_deadline = float(message[1])
                self.judged_at = -float("inf")  # judged at once
        return True

    def drop(self, key: Any) -> None:
        self.lanes.cancel(key)
        self.started.pop(key, None)
        self.jobs.pop(key, None)

    def give_back_late(self) -> None:
        """Stop the jobs that cannot end by the drain's deadline, and have the supervisor give them back."""
        self.judged_at = time.monotonic()
        seconds_left = self.drain_deadline - time.time()
        late = []
        for key, job in self.jobs.items():
            remaining = self.lanes.remaining(key)
            if remaining is None:  # done already, handed back at the next step
                continue
            to_go = seconds_to_go(job.iterations, remaining, time.perf_counter() - self.started[key])
            if not can_finish(to_go, seconds_left):
                late.append(key)
        for key in late:
            log.info("giving %s back: it cannot finish before the interruption", self.jobs[key].work_id)
            self.drop(key)
        if late:
            self.conn.send(("give_back", late))


def give_back_orphaned(jobs: list[Job], worker_key: str, worker_id: str, tls_ca: str) -> None:
    """The supervisor died: give back the jobs this slot held, once each (no time for patience)."""
    for url in sorted({job.endpoint for job in jobs}):
        client = EndpointClient(url, worker_key, worker_id, ca_file=tls_ca)
        try:
            client.release([job for job in jobs if job.endpoint == url])
            log.info("supervisor gone: gave back %d job(s) to %s", sum(job.endpoint == url for job in jobs), url)
        except (EndpointDown, Rejected) as exc:
            log.warning("supervisor gone: could not give back jobs to %s (their leases will expire): %s", url, exc)
        finally:
            client.close()


def run_slot(index: int, conn: Connection, kernel_choice: str, library: str, log_level: int,
             worker_key: str, worker_id: str, tls_ca: str = "") -> None:
    # Ctrl-C and a group-wide SIGTERM reach every process; the supervisor alone decides when slots
    # stop (and a slot whose supervisor died notices by itself).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker[{index}]: %(message)s")
    if index:  # slot 0 logs the choice; the others make the same one
        logging.getLogger("worker").setLevel(max(log_level, logging.ERROR))
    kernel, single = slot_kernels(kernel_choice, library)
    logging.getLogger("worker").setLevel(log_level)
    conn.send(("ready", kernel.name, kernel.lanes, kernel.reason))
    orphaned = Slot(conn, kernel, single, os.getppid()).run()
    if orphaned:
        give_back_orphaned(orphaned, worker_key, worker_id, tls_ca)
