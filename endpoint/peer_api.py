"""The peer API (the peer key): what the other endpoint asks of this one.

POST /internal/peer/take-completed   results marked delivered to the peer under its token
POST /internal/peer/give-back        a take whose answer the peer lost, made undelivered again
GET  /internal/peer/work/<id>        an item of this endpoint, for the peer's GET /work/<id>
"""

from __future__ import annotations

import re

import bottle
from bottle import HTTPResponse, request

from endpoint.inputs import InputError, positive_int, query_params
from endpoint.key_store import KEY_ID_PATTERN
from endpoint.public_api import item_view
from endpoint.routing import Context, json_response
from endpoint.store import owner_of

PEER_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")  # a peer take's token (endpoint/peer.py, endpoint/pulls.py)


def add_routes(app: bottle.Bottle) -> None:
    app.route("/internal/peer/take-completed", "POST", take_completed, auth="peer")
    app.route("/internal/peer/give-back", "POST", give_back, auth="peer")
    app.route("/internal/peer/work/<work_id>", "GET", work_status, auth="peer")


def take_completed(ctx: Context) -> HTTPResponse:
    params = query_params(request.query_string)
    top = positive_int(params, "top", ctx.limits.max_top)
    taken = ctx.store.take_completed(top, peer_delivery_token(params), client_key(params))
    return json_response([{"id": item.work_id, "result": item.result, "completed_at": item.completed_at}
                          for item in taken])


def give_back(ctx: Context) -> HTTPResponse:
    return json_response({"given_back": ctx.store.give_back(peer_delivery_token(query_params(request.query_string)))})


def work_status(ctx: Context, work_id: str) -> HTTPResponse:
    store = ctx.store
    item = store.get(work_id) if owner_of(work_id) == store.node_id else None
    if item is None:
        return json_response({"error": f"no work item {work_id!r}"}, 404)
    return json_response(item_view(item))


def client_key(params: dict[str, str]) -> str | None:
    """The client key (its id) whose results the peer takes; none: those of items enqueued without one."""
    key_id = params.get("client")
    if key_id is not None and not KEY_ID_PATTERN.fullmatch(key_id):
        raise InputError(400, "query parameter 'client' must be 16 hex digits (a client key's id)")
    return key_id


def peer_delivery_token(params: dict[str, str]) -> str:
    token = params.get("delivery", "")
    if not PEER_TOKEN_PATTERN.fullmatch(token):
        raise InputError(400, "query parameter 'delivery' must be 32 hex digits")
    return token
