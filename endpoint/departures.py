"""Workers that said they are leaving: a Spot worker at its interruption notice, and once it left.

POST /internal/leaving {"worker", "reason", "seconds_left", "left"} (the worker key; see
worker/interruption.py). The worker posts it to every endpoint when the notice comes (left:
false, with the seconds until EC2 takes the instance) and again when it has given back or
finished its jobs and exits (left: true). GET /stats counts them (`workers_leaving`), and with
the peer key lists them (`leaving`, by worker id): the scalers count such a worker as gone, so
that its capacity is replaced at once, and terminate its instance once it left or its time is up.

Kept in memory, for an hour and at most MAX_KEPT workers: what it is for is over within minutes,
and after an endpoint restart a scaler still sees the instance go (EC2 ends it) or the worker
fall silent.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import bottle
from bottle import HTTPResponse

from endpoint.inputs import InputError
from endpoint.routing import Context, json_response
from endpoint.worker_api import worker_request

KEPT_S = 3600.0
MAX_KEPT = 10_000
REASON_PATTERN = re.compile(r"[a-z][a-z-]{0,63}")


@dataclass(frozen=True)
class Departure:
    reason: str
    deadline: float  # this endpoint's clock: when the worker's instance is taken
    left: bool
    said_at: float


class Departures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_worker: OrderedDict[str, Departure] = OrderedDict()
        self.announced: dict[str, int] = {}  # workers that said they are leaving, by reason, since this start

    def record(self, worker_id: str, reason: str, seconds_left: float, left: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            earlier = self._by_worker.pop(worker_id, None)
            if earlier is None:
                self.announced[reason] = self.announced.get(reason, 0) + 1
            # A repeat, or word that arrives late, never takes back a "left".
            self._by_worker[worker_id] = Departure(reason, now + seconds_left, left or bool(earlier and earlier.left),
                                                   now)
            self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        while self._by_worker and (len(self._by_worker) > MAX_KEPT
                                   or next(iter(self._by_worker.values())).said_at < now - KEPT_S):
            self._by_worker.popitem(last=False)

    def view(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        with self._lock:
            self._forget_old(now)
            return {worker_id: {"reason": departure.reason, "left": departure.left,
                                "seconds_left": round(max(0.0, departure.deadline - now), 3),
                                "said_s_ago": round(now - departure.said_at, 3)}
                    for worker_id, departure in self._by_worker.items()}

    def annotate(self, figures: dict[str, Any]) -> None:
        """Add them to /stats: `leaving` (by worker id) and its count `workers_leaving`."""
        figures["leaving"] = self.view()
        figures["workers_leaving"] = len(figures["leaving"])

    def counts(self) -> tuple[int, dict[str, int]]:
        """Workers leaving now (kept an hour), and those that said so since this start, by reason."""
        with self._lock:
            self._forget_old(time.time())
            return len(self._by_worker), dict(self.announced)


def add_routes(app: bottle.Bottle) -> None:
    app.route("/internal/leaving", "POST", leaving, auth="worker")


def leaving(ctx: Context) -> HTTPResponse:
    assert ctx.departures is not None  # make_app gives every app its own
    fields = worker_request()
    reason, seconds_left, left = fields.get("reason"), fields.get("seconds_left"), fields.get("left", False)
    if not isinstance(reason, str) or not REASON_PATTERN.fullmatch(reason):
        raise InputError(400, "field 'reason' must be 1-64 characters of [a-z-], such as spot-interruption")
    if isinstance(seconds_left, bool) or not isinstance(seconds_left, (int, float)) \
            or not 0 <= seconds_left <= 86_400:
        raise InputError(400, "field 'seconds_left' must be a number of seconds from 0 to 86400")
    if not isinstance(left, bool):
        raise InputError(400, "field 'left' must be true or false")
    ctx.departures.record(fields["worker"], reason, float(seconds_left), left)
    return json_response({"recorded": True})
