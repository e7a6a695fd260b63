"""Claims that wait for work: a worker with free lanes asks once and hears back when work arrives.

An idle worker's claim waits at the endpoint (long polling) instead of asking again every half
second: every write that may have made an item pending (an enqueue, a release, an expired
lease) bumps a generation count, and the claims waiting on it are answered (empty), so that
their workers claim again at once. A woken claim takes nothing itself: a worker that died while
its claim waited never hears an answer, and so must not be handed a lease in it. The number of claims
that wait at once is bounded (each holds a connection); a claim over the bound is answered at
once ("waited": false) and its worker polls instead.

A claim is named by its worker's token. A worker that stops while its claim waits cancels the
token: the waiting claim ends, and whatever a claim of that token took (its answer lost on the
way) is given back (endpoint/store.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CANCELLED_KEPT_S = 120.0  # a cancelled token is remembered this long (longer than any wait)
# A woken claim's worker claims again within this time (a round trip); until then it counts as
# one that shares what is pending.
COMING_BACK_S = 1.0


class WorkSignal:
    """Generations of "work may have arrived", and the claims waiting for the next one.

    The claims wait on the request reader's event loop (endpoint/bridge.py, which calls listen()
    and leave()), not on threads: a waiting claim costs a connection and a timer, no thread."""

    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._lock = threading.Lock()
        self._generation = 0
        self._waiters = 0
        self._closed = False
        self._listeners: dict[int, Callable[[], None]] = {}
        self._next_listener = 0
        self._cancelled: dict[tuple[str, str], float] = {}
        self._coming_back: dict[str, float] = {}  # worker -> when its claim was answered

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def waiters(self) -> int:
        return self._waiters

    @property
    def closed(self) -> bool:
        return self._closed

    def notify(self, items: int | None = None) -> None:
        """Work may have arrived: `items` of it (that many waiting claims are answered, the longest
        waiting first: each one's worker claims its share of all that is pending), or None: every
        waiting claim is answered. One answered claim per item, not all of them: a stream of
        enqueues must not wake the whole idle fleet for every job."""
        with self._lock:
            self._generation += 1
            keys = list(self._listeners)[:items] if items is not None else list(self._listeners)
            listeners = [self._listeners.pop(key) for key in keys]
        for callback in listeners:
            callback()

    def admit(self) -> bool:
        """A place among the waiting claims, if there is one (given back by leave())."""
        with self._lock:
            if self._closed or self._waiters >= self.max_waiters:
                return False
            self._waiters += 1
            return True

    def listen(self, since: int, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once the generation is past `since` (at once if it is, or if closed)."""
        with self._lock:
            if self._generation == since and not self._closed:
                key = self._next_listener
                self._next_listener += 1
                self._listeners[key] = callback
                return lambda: self._unlisten(key)
        callback()
        return lambda: None

    def _unlisten(self, key: int) -> None:
        with self._lock:
            self._listeners.pop(key, None)

    def leave(self, worker_id: str) -> None:
        with self._lock:
            self._waiters -= 1
            self._coming_back[worker_id] = time.monotonic()

    def sharers(self, worker_id: str) -> int:
        """The other workers that share what is pending now: those waiting, and those whose wait was
        just answered and who are about to claim again. `worker_id` is claiming now."""
        now = time.monotonic()
        with self._lock:
            self._coming_back.pop(worker_id, None)
            self._coming_back = {worker: at for worker, at in self._coming_back.items() if now - at < COMING_BACK_S}
            return self._waiters + len(self._coming_back)

    def close(self) -> None:
        """The endpoint is stopping: every waiting claim is answered now, and none waits from now on."""
        with self._lock:
            self._closed = True
        self.notify()

    def cancel(self, worker_id: str, token: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._cancelled = {key: at for key, at in self._cancelled.items() if now - at < CANCELLED_KEPT_S}
            self._cancelled[(worker_id, token)] = now
        self.notify()  # a waiting claim of that token ends (and its worker's next claim takes nothing)

    def is_cancelled(self, worker_id: str, token: str | None) -> bool:
        return token is not None and (worker_id, token) in self._cancelled
