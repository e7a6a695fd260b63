"""Claims that wait for work: a worker with free lanes asks once and hears back when work arrives.

An idle worker's claim waits at the endpoint (long polling) instead of asking again every half
second: every write that may have made an item pending (an enqueue, a release, an expired
lease) bumps a generation count, and the claims waiting on it are answered (empty), so that
their workers claim again at once. A woken claim takes nothing itself: a worker that died while
its claim waited never hears an answer, and so must not be handed a lease in it. The number of claims
that wait at once is bounded, as each holds one of the server's threads while it waits; a
claim over the bound is answered at once ("waited": false) and its worker backs off instead.

A claim is named by its worker's token. A worker that stops while its claim waits cancels the
token: the waiting claim ends, and whatever a claim of that token took (its answer lost on the
way) is given back (endpoint/store.py).
"""

from __future__ import annotations

import threading
import time

CANCELLED_KEPT_S = 120.0  # a cancelled token is remembered this long (longer than any wait)
# A woken claim's worker claims again within this time (a round trip); until then it counts as
# one that shares what is pending.
COMING_BACK_S = 1.0


class WorkSignal:
    """Generations of "work may have arrived", and the claims waiting for the next one."""

    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self._condition = threading.Condition()
        self._generation = 0
        self._waiters = 0
        self._closed = False
        self._cancelled: dict[tuple[str, str], float] = {}
        self._coming_back: dict[str, float] = {}  # worker -> when its claim was woken

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def waiters(self) -> int:
        return self._waiters

    def notify(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def admit(self) -> bool:
        """A place among the waiting claims, if there is one (give it back with leave())."""
        with self._condition:
            if self._closed or self._waiters >= self.max_waiters:
                return False
            self._waiters += 1
            return True

    def leave(self, worker_id: str) -> None:
        with self._condition:
            self._waiters -= 1
            self._coming_back[worker_id] = time.monotonic()

    def sharers(self, worker_id: str) -> int:
        """The other workers that share what is pending now: those waiting, and those whose wait was
        just answered and who are about to claim again. `worker_id` is claiming now."""
        now = time.monotonic()
        with self._condition:
            self._coming_back.pop(worker_id, None)
            self._coming_back = {worker: at for worker, at in self._coming_back.items() if now - at < COMING_BACK_S}
            return self._waiters + len(self._coming_back)

    def wait(self, since: int, timeout: float) -> None:
        """Until the generation moves past `since`, the signal closes, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._generation == since and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._condition.wait(left)

    def close(self) -> None:
        """The endpoint is stopping: every waiting claim ends now, and none waits from now on."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def cancel(self, worker_id: str, token: str) -> None:
        now = time.monotonic()
        with self._condition:
            self._cancelled = {key: at for key, at in self._cancelled.items() if now - at < CANCELLED_KEPT_S}
            self._cancelled[(worker_id, token)] = now
            self._generation += 1
            self._condition.notify_all()

    def is_cancelled(self, worker_id: str, token: str | None) -> bool:
        return token is not None and (worker_id, token) in self._cancelled
