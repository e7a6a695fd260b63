"""The public API (clients, no key): PUT /enqueue, POST /pullCompleted, GET /work/<id>, GET /stats.

The peer key or the scaler key, when presented, opens the details of GET /work/<id> and GET /stats
(worker ids, the scaler's last error); any other key is refused there (403).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import bottle
from bottle import HTTPResponse, request

from endpoint.inputs import InputError, payload_from, positive_int, query_params
from endpoint.peer import PeerUnavailable
from endpoint.pulls import DELIVERY_TOKEN_PATTERN, Pulled
from endpoint.routing import Context, client_of, details_allowed, json_response
from endpoint.store import owner_of

# Printable ASCII without space, quote, backslash or comma (two headers joined by a comma are refused).
IDEMPOTENCY_KEY_PATTERN = re.compile(r'[!#-+\--\[\]-~]{1,255}')
_TIMESTAMP_FIELDS = ("created_at", "claimed_at", "lease_expires_at", "completed_at", "delivered_at")


def add_routes(app: bottle.Bottle) -> None:
    # With client keys on, these three need one (endpoint/routing.py's ClientKeys).
    app.route("/enqueue", "PUT", enqueue, client=True)
    app.route("/pullCompleted", "POST", pull_completed, client=True)
    app.route("/work/<work_id>", "GET", work_status, client=True, details=True)
    app.route("/stats", "GET", stats)


def enqueue(ctx: Context) -> HTTPResponse:
    params = query_params(request.query_string)
    iterations = positive_int(params, "iterations", ctx.limits.max_iterations)
    environ = request.environ
    # Complete and within the size limit: endpoint/bridge.py read it and set CONTENT_LENGTH to its size.
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    # Not request.content_type: Bottle lower-cases it, and multipart boundaries are case-sensitive.
    payload = payload_from(body, environ.get("CONTENT_TYPE", ""), params, ctx.limits.max_payload_bytes)
    enqueued = ctx.store.enqueue(payload, iterations, idempotency_key(request.get_header("Idempotency-Key")),
                                 client=client_of())
    answer = json_response({"id": enqueued.work_id})
    if enqueued.replayed:
        answer.set_header("Idempotent-Replayed", "true")
    return answer


def pull_completed(ctx: Context) -> HTTPResponse:
    params = query_params(request.query_string)
    top = positive_int(params, "top", ctx.limits.max_top)
    return pulled_response(ctx.pulls.pull(top, delivery_token(params), client_of()))


def work_status(ctx: Context, work_id: str) -> HTTPResponse:
    client = client_of()
    detailed = client is None and details_allowed(ctx.keys)
    store, peer = ctx.store, ctx.peer
    owner = owner_of(work_id)
    not_found = json_response({"error": f"no work item {work_id!r}"}, 404)
    if owner == store.node_id:
        item = store.get(work_id)
        return json_response(public_item(item_view(item), detailed)) if item and _visible(item, client) \
            else not_found
    if owner is None or peer is None:
        return not_found
    if peer.node_id is not None and owner != peer.node_id:
        return not_found  # neither this endpoint's id nor the peer's: no need to ask it
    try:
        view = peer.get_work(work_id)
    except PeerUnavailable as exc:
        return json_response({"error": f"endpoint {owner!r}, which owns this item, is unreachable: {exc}"}, 503)
    return json_response(public_item(view, detailed)) if view and _visible(view, client) else not_found


def _visible(item: dict[str, Any], client: str | None) -> bool:
    """A client key sees the items it enqueued, and no other (as if they did not exist: 404)."""
    return client is None or item.get("client_key") == client


def stats(ctx: Context) -> HTTPResponse:
    # The scaler asks for a longer list of workers than the default two minutes when its
    # silence deadline is longer: a worker missing from the list must mean "silent that long".
    params = query_params(request.query_string)
    window = positive_int(params, "workers_within", 86_400) if "workers_within" in params else None
    detailed = details_allowed(ctx.keys)
    figures = ctx.store.stats(window)
    figures["workers_heard_from"] = len(figures["workers"])
    if ctx.departures is not None:
        ctx.departures.annotate(figures)
    if ctx.usage is not None:
        figures["usage"] = ctx.usage.figures()
    figures["instance_id"] = ctx.instance_id or None
    if not detailed:
        # The public view: counts, not names. Worker ids (instance ids) and the scaler's last
        # error (addresses, SSH and EC2 messages) are for the endpoints and their scalers.
        del figures["workers"]
        figures.pop("leaving", None)
        if figures["scaler"]:
            del figures["scaler"]["last_error"]
    return json_response(figures)


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def item_view(item: dict[str, Any]) -> dict[str, Any]:
    view = {key: value for key, value in item.items() if value is not None or key == "result"}
    for field in _TIMESTAMP_FIELDS:
        if field in view:
            view[field] = iso_time(view[field])
    return view


def public_item(view: dict[str, Any], detailed: bool) -> dict[str, Any]:
    hidden = ("client_key",) if detailed else ("client_key", "worker_id")
    return {key: value for key, value in view.items() if key not in hidden}


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key request header, bare or as the IETF draft's quoted string."""
    if header is None:
        return None
    key = header[1:-1] if len(header) >= 2 and header[0] == header[-1] == '"' else header
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise InputError(400, "header Idempotency-Key must be 1-255 printable ASCII characters without spaces, "
                              "quotes, backslashes or commas, given once")
    return key


def delivery_token(params: dict[str, str]) -> str | None:
    """pullCompleted's optional `delivery` query parameter: the client's name for this pull."""
    token = params.get("delivery")
    if token is not None and not DELIVERY_TOKEN_PATTERN.fullmatch(token):
        raise InputError(400, "query parameter 'delivery' must be 16-128 characters of [A-Za-z0-9_-] "
                              "(a random token per pull, e.g. a UUID)")
    return token


def pulled_response(pulled: Pulled) -> HTTPResponse:
    answer = json_response([{"id": item.work_id, "result": item.result} for item in pulled.items])
    if pulled.replayed:
        answer.set_header("Delivery-Replayed", "true")
    return answer
