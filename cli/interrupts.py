"""Ctrl-C and SIGTERM for the AWS commands and the scaler: stop within a moment, say what runs.

A signal raises `Interrupted` in the main thread, wherever it waits (an API call, a sleep, a
thread pool). The command catches it at the top, reports what it leaves behind, and ends with
`exit_now`: threads still waiting on SSH or on a slow host are abandoned rather than joined,
so the process ends at once instead of when their timeouts run out. A second signal ends the
process immediately, even while that report is being written.

Where a step must not be cut in half (EC2 hands out a key pair's private key once: creating it
and saving it belong together), `deferred_signals` holds a signal back until the step is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 -- a BaseException like KeyboardInterrupt, not an error
    """Ctrl-C or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _Signals:
    deferring = 0
    pending: int | None = None
    received = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _Signals.received:
        exit_now(128 + signum)  # the second one: no more reporting
    _Signals.received = True
    if _Signals.deferring:
        _Signals.pending = signum
        return
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM raise Interrupted in the main thread from now on."""
    for signum in _HANDLED:
        signal.signal(signum, _on_signal)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """A signal that arrives inside is raised when the block is done (not at all if it fails)."""
    _Signals.deferring += 1
    try:
        yield
    finally:
        _Signals.deferring -= 1
    if not _Signals.deferring and _Signals.pending is not None:
        signum, _Signals.pending = _Signals.pending, None
        raise Interrupted(signum)


def exit_now(status: int) -> None:
    """End the process now, with `status`, without waiting for other threads."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing more to say there
            stream.flush()
    os._exit(status)


def parallel(function: Callable[[Item], Result], items: Iterable[Item], max_workers: int = 8) -> list[Result]:
    """`function` over `items` in threads. Unlike a `with ThreadPoolExecutor()`, an Interrupted (or
    an error) here does not wait for the other threads to finish: `exit_now` abandons them."""
    items = list(items)
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))))
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
