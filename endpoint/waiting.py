"""Claims that wait for work: a worker with free lanes asks once and hears back when work arrives.

An idle worker's claim waits at the endpoint (long polling) instead of asking again every half
second: every write that may have made an item pending (an enqueue, a release, an expired
lease) bumps a generation count, and the claims waiting on it are answered (empty), so that
their workers claim again at once. A woken claim takes nothing itself: a worker that died while
its claim waited never hears an answer, and so must not be handed a lease in it. The number of claims
that wait at once is bounded (each holds a connection); a claim over the bound is answered at
once ("waited": false) and its worker polls instead.

A claim is named by its worker's token. A worker that stops while its claim waits cancels the
token: the waiting claim ends (that one alone), and whatever a claim of that token took (its answer
lost on the way) is given back (endpoint/store.py).

A wake for work is owed until its worker claims again. One that does not within COMING_BACK_S (it
filled up with work from the other endpoint meanwhile, or went away) has spent the wake: the store's
maintenance passes it on to the next waiting claim while work is pending (overdue()), and a worker
that cancels the claim it was woken in passes it on at once.
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
        self._listeners: dict[int, tuple[str, Callable[[], None]]] = {}  # key -> (holder, callback)
        self._next_listener = 0
        self._cancelled: dict[tuple[str, str], float] = {}
        self._coming_back: dict[str, float] = {}  # worker -> when its claim was answered
        self._owed: dict[str, float] = {}  # worker -> when its claim was woken for work, until it claims again

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
            if items is not None:
                now = time.monotonic()
                self._owed.update((holder_of(holder)[0], now) for holder, _ in listeners)
        for _, callback in listeners:
            callback()

    def admit(self) -> bool:
        """A place among the waiting claims, if there is one (given back by leave())."""
        with self._lock:
            if self._closed or self._waiters >= self.max_waiters:
                return False
            self._waiters += 1
            return True

    def listen(self, since: int, holder: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once the generation is past `since` (at once if it is, if closed, or if the
        holder's claim, hold_for()'s "<worker> <token>", was cancelled meanwhile)."""
        with self._lock:
            if self._generation == since and not self._closed and holder_of(holder) not in self._cancelled:
                key = self._next_listener
                self._next_listener += 1
                self._listeners[key] = (holder, callback)
                return lambda: self._unlisten(key)
        callback()
        return lambda: None

    def _unlisten(self, key: int) -> None:
        with self._lock:
            self._listeners.pop(key, None)

    def leave(self, holder: str) -> None:
        with self._lock:
            self._waiters -= 1
            self._coming_back[holder_of(holder)[0]] = time.monotonic()

    def claiming(self, worker_id: str) -> None:
        """`worker_id` claims: a wake it was sent is answered."""
        with self._lock:
            self._owed.pop(worker_id, None)

    def overdue(self) -> int:
        """The wakes for work whose workers did not claim again within COMING_BACK_S (forgotten now):
        that many waiting claims are to be woken in their place, if work is still pending."""
        now = time.monotonic()
        with self._lock:
            late = [worker for worker, at in self._owed.items() if now - at >= COMING_BACK_S]
            for worker in late:
                del self._owed[worker]
        return len(late)

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
        """The claim of that token ends if it waits (it alone: the rest of the fleet waits on), and its
        worker's next claim of it takes nothing. A wake for work it was sent is passed on."""
        now = time.monotonic()
        with self._lock:
            self._cancelled = {key: at for key, at in self._cancelled.items() if now - at < CANCELLED_KEPT_S}
            self._cancelled[(worker_id, token)] = now
            holder = hold_for(worker_id, token)
            keys = [key for key, (held_for, _) in self._listeners.items() if held_for == holder]
            ended = [self._listeners.pop(key)[1] for key in keys]
            owed = self._owed.pop(worker_id, None) is not None
            self._coming_back.pop(worker_id, None)
        for callback in ended:
            callback()
        if owed:
            self.notify(1)

    def is_cancelled(self, worker_id: str, token: str | None) -> bool:
        return token is not None and (worker_id, token) in self._cancelled


def hold_for(worker_id: str, token: str | None) -> str:
    """The holder of a waiting claim, as the request reader passes it back: "<worker> <token>"."""
    return f"{worker_id} {token or ''}"


def holder_of(holder: str) -> tuple[str, str]:
    worker_id, _, token = holder.partition(" ")
    return worker_id, token
