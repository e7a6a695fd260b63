"""A slot: one process that hashes the jobs its supervisor hands it, one job per lane of its kernel.

The slot talks to no endpoint: it gets ("run", key, payload, iterations) and ("cancel", key)
over a pipe and answers ("done", key, result, seconds). A lane whose chain ends takes the next
job at once, so jobs of different lengths share the vector; with one job alone the slot runs
the scalar kernel, faster for a single chain than one lane of a vector (worker/native.py).
Between kernel calls (a few milliseconds each; ctypes releases the GIL meanwhile) it reads its
pipe, so a cancelled job stops within one call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from worker.native import CHECK_EVERY, Kernel, Lanes, select_kernel

log = logging.getLogger("worker")

IDLE_POLL_S = 0.5  # an idle slot looks this often whether its supervisor is still there


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
        self.parent_pid = parent_pid

    def run(self) -> None:
        while os.getppid() == self.parent_pid:  # a slot whose supervisor died must not keep computing
            idle = self.lanes.busy() == 0
            if not self.read_messages(IDLE_POLL_S if idle else 0.0):
                return
            for key, result in self.lanes.step(CHECK_EVERY, stop_on_finish=True):
                self.conn.send(("done", key, result, time.perf_counter() - self.started.pop(key)))

    def read_messages(self, timeout: float) -> bool:
        """Every message waiting (the first up to `timeout`); False when told to stop."""
        while self.conn.poll(timeout):
            timeout = 0.0
            message = self.conn.recv()
            if message[0] == "stop":
                return False
            if message[0] == "run":
                _, key, payload, iterations = message
                self.started[key] = time.perf_counter()
                self.lanes.submit(key, payload, iterations)
            elif message[0] == "cancel":
                self.lanes.cancel(message[1])
                self.started.pop(message[1], None)
        return True


def run_slot(index: int, conn: Connection, kernel_choice: str, library: str, log_level: int) -> None:
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
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the supervisor is gone
        Slot(conn, kernel, single, os.getppid()).run()
