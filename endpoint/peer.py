"""Calls from this endpoint to its peer: the pullCompleted fill-up and id look-ups."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from endpoint.store import Delivered

log = logging.getLogger(__name__)


class PeerUnavailable(Exception):
    pass


class Peer:
    """The other endpoint, reached over HTTP with the shared secret.

    After a failed call the peer is skipped for `retry_after` seconds, so that a dead
    peer costs one timeout per interval instead of one per client request.
    """

    def __init__(self, base_url: str, secret: str, timeout: float = 3.0, retry_after: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret = secret
        self._timeout = timeout
        self._retry_after = retry_after
        self._down_until = 0.0
        self._lock = threading.Lock()

    def take_completed(self, limit: int) -> list[Delivered]:
        """Up to `limit` results the peer marks delivered to us; [] if the peer is unreachable."""
        query = urllib.parse.urlencode({"top": limit, "delivery": secrets.token_hex(16)})
        try:
            # The peer repeats a take with the same delivery id, so the retry of a call
            # whose answer got lost returns the same results instead of dropping them.
            items = self._call("POST", f"/internal/peer/take-completed?{query}", attempts=2)
        except PeerUnavailable as exc:
            log.warning("peer %s: pullCompleted fill-up skipped: %s", self.base_url, exc)
            return []
        return [Delivered(item["id"], item["result"], item["completed_at"]) for item in items]

    def get_work(self, work_id: str) -> dict[str, Any] | None:
        """The peer's view of one of its items; None if it does not know the id."""
        try:
            return self._call("GET", f"/internal/peer/work/{urllib.parse.quote(work_id)}")
        except _NotFound:
            return None

    def _call(self, method: str, path: str, attempts: int = 1) -> Any:
        with self._lock:
            if time.monotonic() < self._down_until:
                raise PeerUnavailable("peer marked down after a recent failure")
        error = PeerUnavailable("no attempt made")
        for _ in range(attempts):
            try:
                return self._request(method, path)
            except PeerUnavailable as exc:
                error = exc
        with self._lock:
            self._down_until = time.monotonic() + self._retry_after
        raise error

    def _request(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=b"" if method == "POST" else None,
            headers={"Authorization": f"Bearer {self._secret}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound() from exc
            raise PeerUnavailable(f"HTTP {exc.code} from peer") from exc
        except (OSError, ValueError) as exc:
            raise PeerUnavailable(str(exc)) from exc


class _NotFound(Exception):
    pass
