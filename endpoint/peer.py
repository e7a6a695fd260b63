"""Calls from this endpoint to its peer: the pullCompleted fill-up and id look-ups."""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from cli.tls import client_context, is_https
from endpoint.store import Delivered

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    pass


class _NotFound(Exception):
    pass


class Peer:
    """The other endpoint, reached over HTTP with the peer key.

    After a failed call the peer is skipped for `retry_after` seconds, so that a dead peer
    costs one timeout per interval instead of one per client request.

    A take of the peer's results names itself with a token, and the peer marks its results
    delivered under that token. If the answer never arrives, the results are the peer's
    "delivered" but nobody has them: so the token is kept and replayed by the next pull, and
    the peer answers a replay with the same results. Results of a replay that do not fit into
    that pull's answer are carried over to the next one.

    A pull under a client's delivery token takes from the peer under a token of its own
    (`take_exactly`), and records what came back. If that answer never arrives, the pull
    records an empty peer part and the token is given back (`give_back_later`): the peer makes
    those results undelivered again, before this endpoint takes anything else from it.
    """

    def __init__(self, base_url: str, key: str, timeout: float = 3.0, retry_after: float = 5.0,
                 ca_file: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        # An https peer is checked against the cluster's CA (or the system's): certificate and host name.
        self._tls = client_context(ca_file) if is_https(base_url) else None
        self._key = key
        self._timeout = timeout
        self._retry_after = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()
        # Per client key (None: client keys off): a key is handed only the results of its own items.
        self._unanswered: dict[str | None, collections.deque[tuple[str, int]]] = collections.defaultdict(
            collections.deque)
        self._carried: dict[str | None, list[Delivered]] = collections.defaultdict(list)
        self._to_give_back: dict[str, None] = {}  # tokens of takes whose answer was lost, oldest first
        self.node_id: str | None = None  # the peer's, from its answers: which ids are its own

    def take_completed(self, limit: int, client: str | None = None) -> list[Delivered]:
        """Up to `limit` results the peer marks delivered to us -- of the items client key `client` enqueued,
        or with client keys off (None) of those enqueued without; fewer (maybe none) if it is unreachable.

        Never raises: this endpoint's own results are already taken when this is called."""
        with self._lock:
            carried, unanswered = self._carried[client], self._unanswered[client]
            taken, carried[:] = carried[:limit], carried[limit:]
            if time.monotonic() < self._down_until:
                return taken  # failed moments ago: its log line is written, retry after the pause
            try:
                self._give_back_pending()
                while unanswered and len(taken) < limit:
                    token, original_limit = unanswered[0]
                    items = self._take(token, original_limit, client)
                    unanswered.popleft()
                    room = limit - len(taken)
                    taken += items[:room]
                    carried += items[room:]
                if len(taken) < limit:
                    token = secrets.token_hex(16)
                    unanswered.append((token, limit - len(taken)))
                    taken += self._take(token, limit - len(taken), client)
                    unanswered.pop()
            except PeerUnavailable as exc:  # _call marked it down, unless it already was
                log.warning("peer %s: pullCompleted fill-up incomplete (%d take(s) to replay): %s",
                            self.base_url, len(unanswered), exc)
            except Exception as exc:  # noqa: BLE001 -- a malformed answer: answer with what we have
                log.warning("peer %s: unusable answer to a take (%d to replay): %s",
                            self.base_url, len(unanswered), exc)
                self._mark_down()
            return taken

    def take_exactly(self, token: str, limit: int, client: str | None = None) -> list[Delivered]:
        """One take of up to `limit` results under `token`; a repeat of the token returns what the first
        returned. Raises PeerUnavailable when there is no answer (the peer may have taken them)."""
        with self._lock:
            try:
                # A token given back is taken afresh afterwards, never replayed into a second answer.
                self._give_back_pending()
                return self._take(token, limit, client)
            except PeerUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 -- a malformed answer
                self._mark_down()
                raise PeerUnavailable(f"unusable answer to a take: {exc}") from exc

    def give_back_later(self, token: str) -> None:
        """Have the peer undeliver what it took under `token` (its answer was lost), before any later take."""
        with self._lock:
            self._to_give_back[token] = None

    def marked_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _give_back_pending(self) -> None:
        while self._to_give_back:
            token = next(iter(self._to_give_back))
            try:
                answer = self._call("POST", f"/internal/peer/give-back?{urllib.parse.urlencode({'delivery': token})}")
            except _NotFound:  # a peer of an older version: it keeps them delivered (still readable by id)
                log.error("peer %s cannot give back the results of a lost take: they stay delivered there",
                          self.base_url)
            else:
                if answer.get("given_back"):
                    log.warning("peer %s gave back %s results of a take whose answer was lost", self.base_url,
                                answer["given_back"])
            del self._to_give_back[token]

    def _take(self, token: str, limit: int, client: str | None) -> list[Delivered]:
        query = urllib.parse.urlencode({"top": limit, "delivery": token, **({"client": client} if client else {})})
        items = self._call("POST", f"/internal/peer/take-completed?{query}")
        return [Delivered(str(item["id"]), str(item["result"]), float(item["completed_at"])) for item in items]

    def get_work(self, work_id: str) -> dict[str, Any] | None:
        """The peer's view of one of its items; None if it does not know the id."""
        try:
            return self._call("GET", f"/internal/peer/work/{urllib.parse.quote(work_id)}")
        except _NotFound:
            return None

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        """A GET of one of the peer's routes (the dashboard's figures); PeerUnavailable without an answer."""
        try:
            return self._call("GET", path, timeout)
        except _NotFound as exc:
            raise PeerUnavailable(f"the peer has no {path}") from exc

    def _call(self, method: str, path: str, timeout: float | None = None) -> Any:
        if time.monotonic() < self._down_until:
            raise PeerUnavailable("peer marked down after a recent failure")
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=b"" if method == "POST" else None,
            headers={"Authorization": f"Bearer {self._key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self._timeout, context=self._tls) as response:
                self.node_id = response.headers.get("X-Node-Id") or self.node_id
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                self.node_id = exc.headers.get("X-Node-Id") or self.node_id
                raise _NotFound() from exc
            self._mark_down()
            raise PeerUnavailable(f"HTTP {exc.code} from peer") from exc
        except Exception as exc:  # noqa: BLE001 -- refused, timed out, cut short, or not JSON: all "unavailable"
            self._mark_down()
            raise PeerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _mark_down(self) -> None:
        self._down_until = time.monotonic() + self._retry_after
