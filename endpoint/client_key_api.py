"""The client keys' routes (the operator key), which `python -m endpoint.client_keys` calls at both endpoints:

GET    /internal/client-keys        the keys this endpoint knows: id, name, created_at, revoked_at (no hashes)
PUT    /internal/client-keys/<id>   {"name", "hash"}: record a key (its SHA-256 only); repeatable, 409 if the id
                                    is there with another hash or name
DELETE /internal/client-keys/<id>   revoke it (repeatable); 404 for an unknown id
"""

from __future__ import annotations

import bottle
from bottle import HTTPResponse, request

from endpoint.inputs import InputError
from endpoint.key_store import KEY_HASH_PATTERN, KEY_ID_PATTERN, NAME_PATTERN, KeyConflict
from endpoint.routing import Context, json_response
from endpoint.scaler_record import json_object


def add_routes(app: bottle.Bottle) -> None:
    app.route("/internal/client-keys", "GET", listing, auth="operator")
    app.route("/internal/client-keys/<key_id>", "PUT", record, auth="operator")
    app.route("/internal/client-keys/<key_id>", "DELETE", revoke, auth="operator")


def listing(ctx: Context) -> HTTPResponse:
    return json_response({"keys": ctx.store.client_keys.listing(), "client_keys": "on" if ctx.client_keys else "off"})


def record(ctx: Context, key_id: str) -> HTTPResponse:
    checked_id(key_id)
    fields = json_object(request.body.read())
    name, hashed = fields.get("name"), fields.get("hash")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InputError(400, "name must be 1-100 of letters, digits, spaces and ._@:/+-")
    if not isinstance(hashed, str) or not KEY_HASH_PATTERN.fullmatch(hashed):
        raise InputError(400, "hash must be the key's SHA-256, 64 lowercase hex digits")
    try:
        created = ctx.store.client_keys.add(key_id, name, hashed)
    except KeyConflict:
        raise InputError(409, f"client key {key_id} exists with another hash or name") from None
    return json_response({"id": key_id, "created": created})


def revoke(ctx: Context, key_id: str) -> HTTPResponse:
    revoked = ctx.store.client_keys.revoke(checked_id(key_id))
    if revoked is None:
        raise InputError(404, f"no client key {key_id}")
    return json_response({"id": key_id, "revoked": revoked})


def checked_id(key_id: str) -> str:
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InputError(400, "a client key's id is 16 hex digits")
    return key_id
