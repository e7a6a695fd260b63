"""The scaler's record, owned by its endpoint: the routes the host's scaler posts its runs to.

The scaler (cron/scale.py, a process of its own) keeps nothing between runs. It reads its circuit
breaker in GET /stats and posts each run -- its decision, then what became of its launches -- to
PUT /internal/scaler/runs/<run id>; the endpoint writes it through its single writer (endpoint/
history.py). The scaler key (endpoint/secret.py) opens these routes and the details of /stats,
and nothing else: a scaler takes no results and poses as no endpoint.

PUT /internal/scaler/runs/<run>       the whole record of the run so far; a repeat is harmless
POST /internal/scaler/reset-breaker   `python -m cron.scale --reset-breaker`
PUT /internal/scaler/fleet            the cluster's machines it listed this run, for their cost (endpoint/usage.py)
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import bottle
from bottle import HTTPResponse, request

from endpoint.history import BREAKER_STATES, ERROR_CHARS, EVENT_KINDS, ScalerEvent, ScalerRun
from endpoint.inputs import InputError
from endpoint.routing import Context, json_response
from endpoint.usage import listed_machines

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_EVENTS = 1000
MAX_REASON_CHARS = 2000
COUNT_FIELDS = ("needed", "decided", "allowed", "ready", "booting", "launched", "provisioned", "terminated")


def add_routes(app: bottle.Bottle) -> None:
    app.route("/internal/scaler/runs/<run_id>", "PUT", record_run, auth="scaler")
    app.route("/internal/scaler/reset-breaker", "POST", reset_breaker, auth="scaler")
    app.route("/internal/scaler/fleet", "PUT", record_fleet, auth="scaler")


def record_run(ctx: Context, run_id: str) -> HTTPResponse:
    ctx.store.history.record_run(scaler_run(run_id, json_object(request.body.read())))
    return json_response({"recorded": True})


def reset_breaker(ctx: Context) -> HTTPResponse:
    ctx.store.history.reset_breaker()
    return json_response({"reset": True})


def record_fleet(ctx: Context) -> HTTPResponse:
    assert ctx.usage is not None  # make_app gives every app its own
    machines = listed_machines(json_object(request.body.read()), time.time())
    ctx.usage.record(machines)
    return json_response({"recorded": len(machines)})


def json_object(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body or b"{}")
    except ValueError as exc:
        raise InputError(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise InputError(400, "request body must be a JSON object")
    return fields


def scaler_run(run_id: str, fields: dict[str, Any]) -> ScalerRun:
    """A run's record as posted, checked field by field (a bad one is 400 and writes nothing)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise InputError(400, "the run id must be 1-64 characters of [A-Za-z0-9_.:-]")
    counts = {name: _count(fields, name) for name in COUNT_FIELDS}
    reason = fields.get("reason")
    if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_CHARS:
        raise InputError(400, f"field 'reason' must be a text of 1-{MAX_REASON_CHARS} characters")
    if fields.get("breaker") not in BREAKER_STATES:
        raise InputError(400, f"field 'breaker' must be one of {', '.join(BREAKER_STATES)}")
    threshold = _count(fields, "breaker_threshold")
    if threshold < 1:
        raise InputError(400, "field 'breaker_threshold' must be at least 1")
    return ScalerRun(run_id=run_id, reason=reason, breaker=fields["breaker"], breaker_threshold=threshold,
                     events=_events(fields.get("events", [])), **counts)


def _count(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise InputError(400, f"field {name!r} must be a whole number, 0 or more")
    return value


def _events(raw: Any) -> tuple[ScalerEvent, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_EVENTS:
        raise InputError(400, f"field 'events' must be a list of at most {MAX_EVENTS} events")
    events = []
    for event in raw:
        if not isinstance(event, dict) or event.get("kind") not in EVENT_KINDS \
                or not isinstance(event.get("message", ""), str):
            raise InputError(400, f"each event must be {{\"kind\": one of {', '.join(EVENT_KINDS)}, "
                                  f"\"message\": text}}")
        events.append(ScalerEvent(event["kind"], event.get("message", "")[:ERROR_CHARS]))
    return tuple(events)
