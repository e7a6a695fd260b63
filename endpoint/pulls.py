"""pullCompleted: this endpoint's newest results first, filled up from the peer; and, for clients
that send a delivery token, the same answer again for a repeat of the token.

A pull under a client's token T is two steps, each recorded before the client is answered:

1. In one transaction, this endpoint takes its own results under T (delivery_id
   'client:T') and records T with how many results are left for the peer to fill up.
2. It takes the peer's part under a token derived from T, and records what came back.

A repeat of T returns this endpoint's part from its rows and the peer's part from the record,
so it needs no peer. If step 2 was never recorded (the endpoint crashed, or the write failed
and the client heard an error), the repeat asks the peer again under the same derived token,
and the peer replays its take. If the peer's answer is lost, the pull records an empty peer
part and the peer is told to give those results back (endpoint/peer.py). So a result taken
under T is in T's answer or in nobody's, and every answer for T is the same. Pulls with the
same token are answered one at a time; one that waits too long for another is refused (409).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from endpoint.peer import Peer, PeerUnavailable
from endpoint.store import Delivered, Store

DELIVERY_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
TOKEN_WAIT_S = 5.0  # a pull waits this long for another pull with its token to be answered


class DeliveryInProgress(Exception):
    """Another pull with the same delivery token is still being answered."""


@dataclass(frozen=True)
class Pulled:
    items: list[Delivered]  # newest first
    replayed: bool  # the answer of an earlier pull with the same delivery token


def peer_token(node_id: str, token: str) -> str:
    """The token of the peer's part of a client's delivery: stable, so that the peer replays it,
    and in the 32 hex digits of the peer route."""
    return hashlib.sha256(f"client-delivery\0{node_id}\0{token}".encode()).hexdigest()[:32]


def newest_first(items: list[Delivered]) -> list[Delivered]:
    return sorted(items, key=lambda item: item.completed_at, reverse=True)


class Pulls:
    def __init__(self, store: Store, peer: Peer | None, token_wait_s: float = TOKEN_WAIT_S) -> None:
        self._store = store
        self._peer = peer
        self._token_wait_s = token_wait_s
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # token -> its lock, and how many hold or wait
        self._locks_guard = threading.Lock()

    def pull(self, top: int, token: str | None = None, client: str | None = None) -> Pulled:
        """The results of the items client key `client` (its id) enqueued, or with client keys off (None) of
        those enqueued without a key. A delivery token is the key's own: another key's same token is another
        pull."""
        if token is None:
            results = self._store.take_completed(top, delivery_id=secrets.token_hex(16), client=client)
            if len(results) < top and self._peer is not None:
                results += self._peer.take_completed(top - len(results), client)
            return Pulled(newest_first(results), replayed=False)
        if client is not None:
            token = f"{client}:{token}"  # the key's own (ids are 16 hex digits, tokens have no ':')
        with self._one_at_a_time(token):
            return self._pull_with_token(top, token, client)

    def _pull_with_token(self, top: int, token: str, client: str | None) -> Pulled:
        fill_up = self._peer is not None and not self._peer.marked_down()
        delivery = self._store.take_for_client(token, top, fill_up, client)
        peer_part = delivery.peer_part
        if peer_part is None:  # a first pull, or one whose peer part was never recorded
            peer_part = self._peer_part(token, delivery.peer_limit, client)
        return Pulled(newest_first(delivery.local + peer_part), delivery.replayed)

    def _peer_part(self, token: str, limit: int, client: str | None) -> list[Delivered]:
        derived = peer_token(self._store.node_id, token)
        items: list[Delivered] = []
        if self._peer is not None:  # (none: restarted without one since the first pull)
            try:
                items = self._peer.take_exactly(derived, limit, client)
            except PeerUnavailable:
                # Taken or not, they are not in this answer: the peer gives them back. Before any later
                # take from it, so a repeat of this token that finds its peer part unrecorded (this
                # write failed) takes afresh rather than replay what was given back.
                self._peer.give_back_later(derived)
        return self._store.settle_peer_part(token, items)

    @contextmanager
    def _one_at_a_time(self, token: str) -> Iterator[None]:
        with self._locks_guard:
            lock, users = self._locks.get(token, (threading.Lock(), 0))
            self._locks[token] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=self._token_wait_s):
                raise DeliveryInProgress(token)
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._locks_guard:
                lock, users = self._locks[token]
                if users == 1:
                    del self._locks[token]
                else:
                    self._locks[token] = (lock, users - 1)
