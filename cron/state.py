"""What the scaler remembers between runs -- its decisions and its circuit breaker -- kept by its endpoint.

The scaler writes no file of the endpoint's: it posts each run to its own endpoint over HTTP
with the scaler key (PUT /internal/scaler/runs/<run>, endpoint/scaler_record.py), and the
endpoint writes it through its single writer. What it needs at the start of a run, the
breaker's state included, it reads in the same endpoint's /stats, which it reads anyway for the
queue. So the record survives the scaler's exit (cron starts one process a minute) and the
endpoint's restarts, and has one owner.

A run's record is posted when the run has decided, and again after each launch, provisioning or
termination, the whole record each time: a post that got no answer is made good by the next one,
and the endpoint applies each outcome to the breaker once.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from cli.tls import urlopen

log = logging.getLogger("cron.scale")

POST_TIMEOUT_S = 10.0  # longer than the endpoint's own wait for its writer (5 s)


class EndpointUnreachable(Exception):
    """The scaler's own endpoint did not answer (or refused): its record could not be read or written."""


@dataclass(frozen=True)
class ScalerState:
    consecutive_failures: int = 0
    last_failure_s_ago: float | None = None
    last_error: str | None = None

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ScalerState:
        """The breaker's state as the endpoint's /stats shows it (with the details of the scaler key)."""
        record = stats.get("scaler") or {}
        return cls(int(record.get("consecutive_failures") or 0), record.get("last_failure_s_ago"),
                   record.get("last_error"))


@dataclass(frozen=True)
class Breaker:
    threshold: int = 3  # consecutive launch/provisioning failures that open it
    cooldown_s: float = 600.0  # then one trial launch per cooldown ("half-open") until one succeeds

    def allowance(self, state: ScalerState) -> tuple[int | None, str, str]:
        """How many launches may go ahead -- None (no limit), 0 (open) or 1 (a trial) -- the breaker's
        state (closed, open, half-open) and what to say about it."""
        if state.consecutive_failures < self.threshold:
            return None, "closed", "closed"
        since = math.inf if state.last_failure_s_ago is None else state.last_failure_s_ago
        if since >= self.cooldown_s:
            return 1, "half-open", (f"half-open: one trial launch after {state.consecutive_failures} "
                                    f"consecutive failures")
        # Not the last error itself: this status is part of the decision that public /stats shows.
        return 0, "open", (f"open after {state.consecutive_failures} consecutive failures; "
                           f"next trial in {self.cooldown_s - since:.0f}s, or reset it with --reset-breaker")


def call(url: str, key: str, method: str, body: dict[str, Any] | None = None,
         timeout: float = POST_TIMEOUT_S, ca_file: str = "") -> dict[str, Any]:
    """One call to the scaler's routes of its endpoint; EndpointUnreachable when it gets no good answer."""
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urlopen(request, timeout, ca_file) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace")
        raise EndpointUnreachable(f"{method} {url}: HTTP {exc.code} {detail}") from exc
    except (OSError, ValueError) as exc:
        raise EndpointUnreachable(f"{method} {url}: {exc}") from exc


def reset_breaker(endpoint_url: str, key: str, ca_file: str = "") -> None:
    call(f"{endpoint_url.rstrip('/')}/internal/scaler/reset-breaker", key, "POST", ca_file=ca_file)


class RunRecord:
    """One run's record, posted to the endpoint as the run goes on (from the provisioning threads too)."""

    def __init__(self, endpoint_url: str, key: str, node_id: str, breaker: Breaker, ca_file: str = "") -> None:
        self.url = f"{endpoint_url.rstrip('/')}/internal/scaler/runs/{node_id}-{secrets.token_hex(8)}"
        self.key = key
        self.ca_file = ca_file
        self.breaker = breaker
        self.fields: dict[str, Any] = {"launched": 0, "provisioned": 0, "terminated": 0, "events": []}
        self.decided_yet = False
        self.unposted = False  # the endpoint has not confirmed the record as it is now
        self._lock = threading.Lock()

    def decided(self, reason: str, *, needed: int, decided: int, allowed: int, ready: int, booting: int,
                breaker: str) -> None:
        with self._lock:
            self.fields.update(reason=reason, needed=needed, decided=decided, allowed=allowed, ready=ready,
                               booting=booting, breaker=breaker, breaker_threshold=self.breaker.threshold)
            self.decided_yet = True
            self._post()

    def failure(self, kind: str, message: str) -> None:
        """A launch_failure or provisioning_failure: counts toward the circuit breaker."""
        self._add(event={"kind": kind, "message": message})

    def success(self) -> None:
        """A worker provisioned: closes the circuit breaker."""
        self._add(event={"kind": "success"}, counter="provisioned")

    def launched(self, count: int) -> None:
        self._add(counter="launched", amount=count)

    def terminated(self) -> None:
        self._add(counter="terminated")

    def flush(self) -> None:
        """At the end of a run: one more try for a record the endpoint has not confirmed."""
        with self._lock:
            if self.unposted and self.decided_yet:
                self._post()

    def _add(self, event: dict[str, str] | None = None, counter: str = "", amount: int = 1) -> None:
        with self._lock:
            if event is not None:
                self.fields["events"].append(event)
            if counter:
                self.fields[counter] += amount
            self.unposted = True
            if self.decided_yet:  # outcomes of the reconcile before the decision go with it
                self._post()

    def _post(self) -> None:
        try:
            call(self.url, self.key, "PUT", self.fields, ca_file=self.ca_file)
        except EndpointUnreachable as exc:
            self.unposted = True
            log.warning("this run's record was not written (the next post of this run repeats it): %s", exc)
        else:
            self.unposted = False
