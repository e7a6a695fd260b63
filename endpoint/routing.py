"""How a request reaches a route: the app's shared objects, and the Bottle plugins around every route.

A route is a plain function that takes the app's `Context` first, then its URL arguments, and
returns an HTTPResponse. A route module registers its routes in `add_routes(app)`, naming the
role each one needs in the route's config:

    app.route("/internal/claims", "POST", claims, auth="worker")

Four plugins, installed by endpoint/app.py on every route, do the rest (outermost first):

* `Authentication`: a route's `auth` is "worker", "peer" or "scaler" (HTTP Bearer with that
  role's key; 401 without a key, 403 with another, and the answer carries X-Node-Id so that the
  peer learns which ids are this node's) or "operator" (HTTP Basic, the operator key as the
  password; 401 with a challenge). Without `auth` a route is public. Keys come from the cluster
  secret (endpoint/secret.py); none opens another role's routes.
* `ClientKeys`: with client keys on (`--client-keys on`), a route with `client=True` (the
  clients' routes) opens only to a live client key (HTTP Bearer; 401 without a key, 403 with an
  unknown or revoked one), and `client_of()` names the key's id for the route, which serves that
  key's items alone. With `details=True` the peer key and the scaler key open it too, as before.
  With client keys off, nothing changes: the routes are public.
* `JsonErrors`: what a route raises of InputError, the store's errors (not stored, disk full,
  outcome unknown), a reused Idempotency-Key and a refused delivery token becomes its JSON
  answer. A route skips it with `skip=[JSON_ERRORS]`.
* `WithContext`: passes the app's Context to the route.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bottle
from bottle import HTTPError, HTTPResponse, request, response

from endpoint.inputs import InputError
from endpoint.pulls import DeliveryInProgress
from endpoint.secret import operator_key, peer_key, scaler_key, worker_key
from endpoint.store import DeliveryTokenExpired, DiskFull, IdempotencyKeyReused, OutcomeUnknown, StoreUnavailable

if TYPE_CHECKING:
    from endpoint.departures import Departures
    from endpoint.metrics import Metrics
    from endpoint.peer import Peer
    from endpoint.pulls import Pulls
    from endpoint.store import Store
    from endpoint.usage import Usage

log = logging.getLogger(__name__)

JSON_ERRORS = "json_errors"  # the name of the JsonErrors plugin, for a route's skip=[...]
BEARER_ROLES = ("worker", "peer", "scaler")
OPERATOR_REALM = 'Basic realm="dynamic-workload operator", charset="UTF-8"'
Route = Callable[..., Any]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 4 * 1024 * 1024
    max_iterations: int = 100_000_000
    max_top: int = 1000


@dataclass(frozen=True)
class Keys:
    """The keys callers present, one per role, derived from the cluster secret."""

    worker: str
    peer: str
    scaler: str
    operator: str

    @classmethod
    def from_secret(cls, secret: str) -> Keys:
        return cls(worker_key(secret), peer_key(secret), scaler_key(secret), operator_key(secret))


@dataclass(frozen=True)
class Context:
    """What the routes of one app share."""

    store: Store
    limits: Limits
    keys: Keys
    metrics: Metrics
    pulls: Pulls
    peer: Peer | None = None
    instance_id: str = ""
    departures: Departures | None = None  # workers that said they are leaving (Spot interruptions)
    usage: Usage | None = None  # what the worker machines cost
    client_keys: bool = False  # the clients' routes need a client key (endpoint/key_store.py)
    # Threads that ask the peer while a route does its own work (the dashboard).
    peer_asking: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="dashboard-peer"))


class JsonBottle(bottle.Bottle):
    """Bottle whose error pages (its own 404/405/500 included) are JSON."""

    def default_error_handler(self, res: HTTPError) -> str:
        response.content_type = "application/json"
        message = res.body if isinstance(res.body, str) and res.body else res.status_line
        if res.status_code >= 500 and res.exception is not None:
            message = "internal error"
        return json.dumps({"error": message})


def json_response(value: Any, status: int = 200) -> HTTPResponse:
    return HTTPResponse(json.dumps(value), status=status, headers={"Content-Type": "application/json"})


class Plugin:
    """A Bottle plugin (API 2) of one app: apply(callback, route) sees the route's config."""

    api = 2

    def __init__(self, context: Context) -> None:
        self.context = context


# -- authentication --------------------------------------------------------------------------

def presents(key: str) -> bool | None:
    """None if the caller presented no bearer key, else whether it presented `key`."""
    scheme, _, token = request.get_header("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return hmac.compare_digest(token.encode(), key.encode())


def details_allowed(keys: Keys) -> bool:
    """Whether the caller presented the peer key (the endpoints) or the scaler key, which open the details of
    the public answers: worker ids (instance ids, host names) and the scaler's last error. Any other key: 403."""
    holds = presents(keys.peer) or presents(keys.scaler)
    if holds is False:
        raise InputError(403, "wrong credentials: the details need the peer key or the scaler key")
    return bool(holds)


def basic_password(authorization: str) -> str | None:
    """The password of an HTTP Basic Authorization header, or None if it is not one."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon else None


def bearer_refusal(key: str) -> HTTPResponse | None:
    holds = presents(key)
    if holds is None:
        return json_response({"error": "missing credentials: send Authorization: Bearer <key>"}, 401)
    if not holds:
        return json_response({"error": "wrong credentials for this route"}, 403)
    return None


def operator_refusal(key: str) -> HTTPResponse | None:
    password = basic_password(request.get_header("Authorization", ""))
    if password is not None and hmac.compare_digest(password.encode(), key.encode()):
        return None
    # 401 with a challenge, so that a browser asks for the password (again).
    message = ("the details need the operator key (HTTP Basic: any user name, the operator key as the "
               "password; `python -m endpoint.operator_key` prints it)")
    return HTTPResponse(json.dumps({"error": message}), status=401,
                        headers={"Content-Type": "application/json", "WWW-Authenticate": OPERATOR_REALM})


class Authentication(Plugin):
    """Opens a route with `auth=<role>` only to callers presenting that role's key."""

    name = "authentication"

    def apply(self, callback: Route, route: bottle.Route) -> Route:
        role = route.config.get("auth")
        if role is None:
            return callback
        if role == "operator":
            return self._guarded(callback, functools.partial(operator_refusal, self.context.keys.operator), False)
        if role in BEARER_ROLES:
            return self._guarded(callback, functools.partial(bearer_refusal, getattr(self.context.keys, role)), True)
        raise ValueError(f"route {route.rule}: unknown auth role {role!r}")

    def _guarded(self, callback: Route, refusal: Callable[[], HTTPResponse | None], node_header: bool) -> Route:
        store = self.context.store

        def guarded(*args: Any, **kwargs: Any) -> Any:
            refused = refusal()
            if refused is not None:
                return refused
            answer = callback(*args, **kwargs)
            if node_header and isinstance(answer, HTTPResponse):  # so that the peer learns which ids are this node's
                answer.set_header("X-Node-Id", store.node_id)
            return answer

        return guarded


# -- client keys -----------------------------------------------------------------------------

CLIENT_KEY_ENVIRON = "dw.client_key"  # the id of the client key the request presented


def client_of() -> str | None:
    """The id of the live client key this request presented; None with client keys off (or the peer's
    and the scaler's details)."""
    return request.environ.get(CLIENT_KEY_ENVIRON)


class ClientKeys(Plugin):
    """With client keys on, opens a route with `client=True` only to a live client key."""

    name = "client_keys"

    def apply(self, callback: Route, route: bottle.Route) -> Route:
        if not (self.context.client_keys and route.config.get("client")):
            return callback
        keys, store = self.context.keys, self.context.store
        details = bool(route.config.get("details"))

        def guarded(*args: Any, **kwargs: Any) -> Any:
            scheme, _, token = request.get_header("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return json_response({"error": "missing credentials: this endpoint needs a client key "
                                               "(Authorization: Bearer <client key>)"}, 401)
            if details and (presents(keys.peer) or presents(keys.scaler)):
                return callback(*args, **kwargs)
            holder, live = store.client_keys.holder(token)
            if not live:
                return json_response({"error": "this client key is revoked" if holder else "unknown client key"},
                                     403)
            request.environ[CLIENT_KEY_ENVIRON] = holder
            return callback(*args, **kwargs)

        return guarded


# -- errors ----------------------------------------------------------------------------------

def store_unavailable(exc: Exception) -> HTTPResponse:
    """A write the store did not take (503, safe to retry; 507 when its disk is full) or could not
    confirm in time (504)."""
    if isinstance(exc, DiskFull):  # the writer logs it (at most once a minute)
        answer = json_response({"error": "the endpoint's disk is full, nothing was stored; retry later (or at the "
                                         "other endpoint)", "outcome": "not_stored", "reason": "disk_full"}, 507)
        answer.set_header("Retry-After", "5")
        return answer
    if isinstance(exc, OutcomeUnknown):
        log.error("write outcome unknown: %s", exc)
        return json_response({"error": "storage did not confirm the write in time: it may or may not have been "
                                       "stored (retry with the same Idempotency-Key to be sure)",
                              "outcome": "unknown"}, 504)
    log.error("store unavailable: %s", exc)
    answer = json_response({"error": "storage unavailable, nothing was stored; retry later", "outcome": "not_stored"},
                           503)
    answer.set_header("Retry-After", "1")
    return answer


def delivery_refused(exc: DeliveryTokenExpired | DeliveryInProgress, token_ttl_s: float) -> HTTPResponse:
    """A pull with a delivery token that takes nothing: the token is too old (410), or busy (409)."""
    if isinstance(exc, DeliveryTokenExpired):
        return json_response({"error": f"this delivery token was first used more than {token_ttl_s:g} s ago and "
                                       f"its answer is no longer kept; pull with a new token"}, 410)
    return json_response({"error": "a pull with this delivery token is still being answered; repeat it in a "
                                   "moment"}, 409)


class JsonErrors(Plugin):
    """Turns input and store errors into their HTTP answers."""

    name = JSON_ERRORS

    def apply(self, callback: Route, route: bottle.Route) -> Route:
        store = self.context.store

        def answered(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except InputError as exc:
                return json_response({"error": exc.message}, exc.status)
            except (StoreUnavailable, OutcomeUnknown) as exc:
                return store_unavailable(exc)
            except IdempotencyKeyReused as exc:
                return json_response({"error": f"Idempotency-Key was first used for another request (other payload "
                                               f"or iterations), which made {exc}"}, 422)
            except (DeliveryTokenExpired, DeliveryInProgress) as exc:
                return delivery_refused(exc, store.delivery_token_ttl_s)

        return answered


class WithContext(Plugin):
    """Passes the app's Context to each route, before its URL arguments."""

    name = "context"

    def apply(self, callback: Route, route: bottle.Route) -> Route:
        return functools.partial(callback, self.context)


def install(app: bottle.Bottle, context: Context) -> None:
    """The plugins, outermost first: Bottle applies the last installed innermost."""
    for plugin in (Authentication(context), ClientKeys(context), JsonErrors(context), WithContext(context)):
        app.install(plugin)
