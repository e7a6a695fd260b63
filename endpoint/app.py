"""The endpoint's HTTP API: Bottle routes, each a plain function.

Public (clients, unauthenticated):   PUT /enqueue, POST /pullCompleted, GET /work/<id>, GET /stats
Worker (the worker key):             POST /internal/claims, /internal/claims/cancel, /internal/leases/{renew,release},
                                     /internal/results (batches); /internal/claim, /internal/work/<id>/{renew,release,
                                     result} (one job)
Peer (the peer key):                 POST /internal/peer/take-completed, /internal/peer/give-back,
                                     GET /internal/peer/work/<id>
Both keys are derived from the cluster secret (endpoint/secret.py); neither opens the other's routes.

Every error is JSON {"error": "..."} with a 4xx status for anything a client sent wrong. A write
the store did not take is 503 with "outcome": "not_stored" (retry), 507 with "reason": "disk_full"
as well when the disk is full; one whose commit had not finished within the store's wait is 504
with "outcome": "unknown".
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import bottle
from bottle import HTTPError, HTTPResponse, request, response

from endpoint import dashboard, scaler_record
from endpoint.bridge import HOLD_HEADER
from endpoint.inputs import InputError, payload_from, positive_int, query_params
from endpoint.metrics import Metrics
from endpoint.peer import Peer, PeerUnavailable
from endpoint.pulls import DELIVERY_TOKEN_PATTERN, DeliveryInProgress, Pulled, Pulls
from endpoint.secret import operator_key, peer_key, scaler_key, worker_key
from endpoint.store import (
    Claim,
    Delivered,
    DeliveryTokenExpired,
    DiskFull,
    IdempotencyKeyReused,
    LeaseAnswer,
    OutcomeUnknown,
    Store,
    StoreUnavailable,
    WorkerReport,
    owner_of,
)

log = logging.getLogger(__name__)

RESULT_PATTERN = re.compile(r"[0-9a-f]{128}")
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
CLAIM_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
PEER_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")  # a peer take's token (endpoint/peer.py, endpoint/pulls.py)
# Printable ASCII without space, quote, backslash or comma (two headers joined by a comma are refused).
IDEMPOTENCY_KEY_PATTERN = re.compile(r'[!#-+\--\[\]-~]{1,255}')
LEASE_LOST = {
    LeaseAnswer.COMPLETED: "the item is completed",
    LeaseAnswer.LEASED_ELSEWHERE: "the item is leased to another attempt",
    LeaseAnswer.NOT_LEASED: "the lease expired and nobody holds the item now (a result is still accepted)",
}
# Batches of the worker API: items per request, and the longest a claim may wait for work (well
# below the idle timeouts of proxies and of the worker's own HTTP client, which adds this to its own).
MAX_BATCH_ITEMS = 1000
MAX_CLAIM_JOBS = 256
MAX_CLAIM_WAIT_S = 30.0
JOBS_CONTENT_TYPE = "application/x-dw-jobs"
KERNEL_PATTERN = re.compile(r"[a-z0-9_]{1,16}")
_TIMESTAMP_FIELDS = ("created_at", "claimed_at", "lease_expires_at", "completed_at", "delivered_at")


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 4 * 1024 * 1024
    max_iterations: int = 100_000_000
    max_top: int = 1000


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


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number here")


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key request header, bare or as the IETF draft's quoted string."""
    if header is None:
        return None
    key = header[1:-1] if len(header) >= 2 and header[0] == header[-1] == '"' else header
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise InputError(400, "header Idempotency-Key must be 1-255 printable ASCII characters without spaces, "
                              "quotes, backslashes or commas, given once")
    return key


def claim_token_of(fields: dict[str, Any]) -> str | None:
    token = fields.get("claim")
    if token is not None and (not isinstance(token, str) or not CLAIM_TOKEN_PATTERN.fullmatch(token)):
        raise InputError(400, "field 'claim' must be 1-64 characters of [A-Za-z0-9_-]")
    return token


def bounded_int(fields: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(400, f"field {name!r} must be an integer from {low} to {high}")
    return value


def bounded_seconds(fields: dict[str, Any], name: str, high: float) -> float:
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise InputError(400, f"field {name!r} must be a number of seconds from 0 to {high:g}")
    return float(value)


def attempt_of(fields: dict[str, Any]) -> int:
    attempt = fields.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt < 2**31:
        raise InputError(400, "field 'attempt' must be a positive integer")
    return attempt


def result_of(fields: dict[str, Any]) -> tuple[str, float | None]:
    result = fields.get("result")
    if not isinstance(result, str) or not RESULT_PATTERN.fullmatch(result):
        raise InputError(400, "field 'result' must be 128 lowercase hex digits")
    duration = fields.get("duration_s")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not 0 <= duration < 1e7):
        raise InputError(400, "field 'duration_s' must be a number of seconds, 0 or more")
    return result, duration


def batch_items(fields: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The list field `name` of a batch request: 1 to MAX_BATCH_ITEMS objects, each with a work id."""
    items = fields.get(name)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise InputError(400, f"field {name!r} must be a list of 1 to {MAX_BATCH_ITEMS} objects")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not 1 <= len(item["id"]) <= 64:
            raise InputError(400, f"{name}[{index}] must be an object with an 'id' of 1-64 characters")
    return items


def checked_items(items: list[dict[str, Any]], name: str, check: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """check(item) for every item; the first bad one refuses the whole batch, naming it (nothing is changed)."""
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(check(item))
        except InputError as exc:
            raise InputError(exc.status, f"{name}[{index}]: {exc.message}") from None
    return checked


def worker_report(fields: dict[str, Any]) -> WorkerReport | None:
    """What a claiming worker says of itself (optional, all three fields or none)."""
    if "kernel" not in fields:
        return None
    kernel = fields["kernel"]
    if not isinstance(kernel, str) or not KERNEL_PATTERN.fullmatch(kernel):
        raise InputError(400, "field 'kernel' must be 1-16 characters of [a-z0-9_]")
    processes = bounded_int(fields, "processes", 0, 1, 4096)
    return WorkerReport(kernel, processes, bounded_int(fields, "capacity", 0, 1, 1 << 20))


def jobs_response(claims: list[Claim], pending: int, waited: bool, lease_seconds: float,
                  hold: str = "") -> HTTPResponse:
    """A batch of jobs: one line of JSON that describes them, then their payloads back to back. With
    `hold`, the request reader holds the answer until work arrives (endpoint/bridge.py)."""
    manifest = {
        "jobs": [{"id": claim.work_id, "iterations": claim.iterations, "attempt": claim.attempt,
                  "payload_bytes": len(claim.payload)} for claim in claims],
        "lease_seconds": lease_seconds,
        "pending": pending,
        "waited": waited,
    }
    body = b"".join([json.dumps(manifest).encode(), b"\n", *(claim.payload for claim in claims)])
    headers = {"Content-Type": JOBS_CONTENT_TYPE, **({HOLD_HEADER.decode(): hold} if hold else {})}
    return HTTPResponse(body, status=200, headers=headers)


def claim_jobs(store: Store, fields: dict[str, Any], limits: Limits) -> HTTPResponse:
    token = claim_token_of(fields)
    if token is None:
        raise InputError(400, "field 'claim' is required: the worker's name for this claim")
    max_bytes = bounded_int(fields, "max_bytes", limits.max_payload_bytes, 1, 1 << 31)
    batch = store.claim_batch(fields["worker"], token, bounded_int(fields, "max_jobs", 1, 1, MAX_CLAIM_JOBS),
                              max_bytes, bounded_seconds(fields, "wait_s", MAX_CLAIM_WAIT_S), worker_report(fields))
    return jobs_response(batch.claims, batch.pending, batch.waited, store.lease_seconds, batch.hold)


def cancel_claim(store: Store, fields: dict[str, Any]) -> HTTPResponse:
    token = claim_token_of(fields)
    if token is None:
        raise InputError(400, "field 'claim' is required")
    return json_response({"released": store.cancel_claim(fields["worker"], token)})


def lease_batch(fields: dict[str, Any]) -> list[tuple[str, int]]:
    items = batch_items(fields, "leases")
    return list(zip((item["id"] for item in items), checked_items(items, "leases", attempt_of), strict=True))


def renew_leases(store: Store, fields: dict[str, Any]) -> HTTPResponse:
    answers = store.renew_batch(fields["worker"], lease_batch(fields))
    return json_response({"answers": [answer.value for answer in answers], "lease_seconds": store.lease_seconds})


def release_leases(store: Store, fields: dict[str, Any]) -> HTTPResponse:
    answers = store.release_batch(fields["worker"], lease_batch(fields))
    return json_response({"answers": [answer.value for answer in answers]})


def submit_results(store: Store, fields: dict[str, Any], metrics: Metrics) -> HTTPResponse:
    """Each result on its own: "done" (stored), "completed" (the item had a result already: the first
    stored wins, ours is dropped) or "no_such_item"."""
    items = batch_items(fields, "results")
    checked = checked_items(items, "results", result_of)
    answers = store.complete_batch(fields["worker"], [(item["id"], result, duration)
                                                      for item, (result, duration) in zip(items, checked, strict=True)])
    for answer in answers:
        metrics.result_answer(answer)
    return json_response({"answers": [answer.value for answer in answers]})
def delivery_token(params: dict[str, str]) -> str | None:
    """pullCompleted's optional `delivery` query parameter: the client's name for this pull."""
    token = params.get("delivery")
    if token is not None and not DELIVERY_TOKEN_PATTERN.fullmatch(token):
        raise InputError(400, "query parameter 'delivery' must be 16-128 characters of [A-Za-z0-9_-] "
                              "(a random token per pull, e.g. a UUID)")
    return token


def peer_delivery_token(params: dict[str, str]) -> str:
    token = params.get("delivery", "")
    if not PEER_TOKEN_PATTERN.fullmatch(token):
        raise InputError(400, "query parameter 'delivery' must be 32 hex digits")
    return token


def pulled_response(pulled: Pulled) -> HTTPResponse:
    answer = json_response([{"id": item.work_id, "result": item.result} for item in pulled.items])
    if pulled.replayed:
        answer.set_header("Delivery-Replayed", "true")
    return answer


def delivery_refused(exc: DeliveryTokenExpired | DeliveryInProgress, token_ttl_s: float) -> HTTPResponse:
    """A pull with a delivery token that takes nothing: the token is too old (410), or busy (409)."""
    if isinstance(exc, DeliveryTokenExpired):
        return json_response({"error": f"this delivery token was first used more than {token_ttl_s:g} s ago and "
                                       f"its answer is no longer kept; pull with a new token"}, 410)
    return json_response({"error": "a pull with this delivery token is still being answered; repeat it in a "
                                   "moment"}, 409)


def lease_response(node_id: str, work_id: str, answer: LeaseAnswer, done: dict[str, Any]) -> HTTPResponse:
    """The one answer of renew, release and result: done, moved on (409 with a reason), or 404."""
    if answer is LeaseAnswer.DONE:
        return json_response(done)
    if answer is LeaseAnswer.NO_SUCH_ITEM:
        raise InputError(404, f"no work item {work_id!r} at endpoint {node_id!r}")
    return json_response({"error": f"lease lost: {LEASE_LOST[answer]}", "reason": answer.value}, 409)


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


def make_app(store: Store, secret: str, limits: Limits, peer: Peer | None = None,
             instance_id: str = "", metrics: Metrics | None = None) -> bottle.Bottle:
    """`secret` is the cluster secret; callers present the key derived from it for their role."""
    app = JsonBottle()
    metrics = metrics or Metrics(store)

    def client_errors(route: Callable[..., Any]) -> Callable[..., Any]:
        """Turn input and store errors into their HTTP answers."""

        @functools.wraps(route)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return route(*args, **kwargs)
            except InputError as exc:
                return json_response({"error": exc.message}, exc.status)
            except (StoreUnavailable, OutcomeUnknown) as exc:
                return store_unavailable(exc)
            except IdempotencyKeyReused as exc:
                return json_response({"error": f"Idempotency-Key was first used for another request (other payload "
                                               f"or iterations), which made {exc}"}, 422)
            except (DeliveryTokenExpired, DeliveryInProgress) as exc:
                return delivery_refused(exc, store.delivery_token_ttl_s)

        return wrapper

    def presents(key: str) -> bool | None:
        """None if the caller presented no key, else whether it presented `key`."""
        scheme, _, token = request.get_header("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return hmac.compare_digest(token.encode(), key.encode())

    def requires(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Internal routes: only callers presenting `key`."""

        def decorator(route: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(route)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                holds = presents(key)
                if holds is None:
                    return json_response({"error": "missing credentials: send Authorization: Bearer <key>"}, 401)
                if not holds:
                    return json_response({"error": "wrong credentials for this route"}, 403)
                answer = route(*args, **kwargs)
                if isinstance(answer, HTTPResponse):  # so that the peer learns which ids are this node's
                    answer.set_header("X-Node-Id", store.node_id)
                return answer

            return wrapper

        return decorator

    endpoint_key, scalers_key = peer_key(secret), scaler_key(secret)
    worker_only, peer_only = requires(worker_key(secret)), requires(endpoint_key)

    def details_allowed() -> bool:
        """Whether the caller presented the peer key (the endpoints) or the scaler key, which open the details of
        the public answers: worker ids (instance ids, host names) and the scaler's last error. Any other key: 403."""
        holds = presents(endpoint_key) or presents(scalers_key)
        if holds is False:
            raise InputError(403, "wrong credentials: the details need the peer key or the scaler key")
        return bool(holds)

    def public_item(view: dict[str, Any], detailed: bool) -> dict[str, Any]:
        return view if detailed else {key: value for key, value in view.items() if key != "worker_id"}

    # -- public API ----------------------------------------------------------------------

    @app.route("/enqueue", method="PUT")
    @client_errors
    def enqueue() -> HTTPResponse:
        params = query_params(request.query_string)
        iterations = positive_int(params, "iterations", limits.max_iterations)
        environ = request.environ
        # Complete and within the size limit: endpoint/bridge.py read it and set CONTENT_LENGTH to its size.
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        # Not request.content_type: Bottle lower-cases it, and multipart boundaries are case-sensitive.
        payload = payload_from(body, environ.get("CONTENT_TYPE", ""), params, limits.max_payload_bytes)
        enqueued = store.enqueue(payload, iterations, idempotency_key(request.get_header("Idempotency-Key")))
        answer = json_response({"id": enqueued.work_id})
        if enqueued.replayed:
            answer.set_header("Idempotent-Replayed", "true")
        return answer

    pulls = Pulls(store, peer)

    @app.route("/pullCompleted", method="POST")
    @client_errors
    def pull_completed() -> HTTPResponse:
        params = query_params(request.query_string)
        top = positive_int(params, "top", limits.max_top)
        return pulled_response(pulls.pull(top, delivery_token(params)))

    @app.route("/work/<work_id>", method="GET")
    @client_errors
    def work_status(work_id: str) -> HTTPResponse:
        detailed = details_allowed()
        owner = owner_of(work_id)
        not_found = json_response({"error": f"no work item {work_id!r}"}, 404)
        if owner == store.node_id:
            item = store.get(work_id)
            return json_response(public_item(item_view(item), detailed)) if item else not_found
        if owner is None or peer is None:
            return not_found
        if peer.node_id is not None and owner != peer.node_id:
            return not_found  # neither this endpoint's id nor the peer's: no need to ask it
        try:
            view = peer.get_work(work_id)
        except PeerUnavailable as exc:
            return json_response({"error": f"endpoint {owner!r}, which owns this item, is unreachable: {exc}"}, 503)
        return json_response(public_item(view, detailed)) if view else not_found

    @app.route("/stats", method="GET")
    @client_errors
    def stats() -> HTTPResponse:
        # The scaler asks for a longer list of workers than the default two minutes when its
        # silence deadline is longer: a worker missing from the list must mean "silent that long".
        params = query_params(request.query_string)
        window = positive_int(params, "workers_within", 86_400) if "workers_within" in params else None
        detailed = details_allowed()
        figures = store.stats(window)
        figures["workers_heard_from"] = len(figures["workers"])
        figures["instance_id"] = instance_id or None
        if not detailed:
            # The public view: counts, not names. Worker ids (instance ids) and the scaler's last
            # error (addresses, SSH and EC2 messages) are for the endpoints and their scalers.
            del figures["workers"]
            if figures["scaler"]:
                del figures["scaler"]["last_error"]
        return json_response(figures)

    # -- worker API ----------------------------------------------------------------------

    def worker_request() -> dict[str, Any]:
        try:
            fields = json.loads(request.body.read() or b"{}", parse_constant=_reject_constant)
        except ValueError as exc:
            raise InputError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise InputError(400, "request body must be a JSON object")
        worker_id = fields.get("worker")
        if not isinstance(worker_id, str) or not WORKER_ID_PATTERN.fullmatch(worker_id):
            raise InputError(400, "field 'worker' must be 1-128 characters of [A-Za-z0-9._:@-]")
        return fields

    def lease_answer(work_id: str, answer: LeaseAnswer, done: dict[str, Any]) -> HTTPResponse:
        return lease_response(store.node_id, work_id, answer, done)

    @app.route("/internal/claim", method="POST")
    @worker_only
    @client_errors
    def claim() -> HTTPResponse:
        fields = worker_request()
        claimed = store.claim(fields["worker"], claim_token_of(fields))
        if claimed is None:
            return HTTPResponse(status=204)
        return HTTPResponse(
            claimed.payload,
            status=200,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Work-Id": claimed.work_id,
                "X-Iterations": str(claimed.iterations),
                "X-Attempt": str(claimed.attempt),
                "X-Lease-Seconds": str(claimed.lease_seconds),
            },
        )

    @app.route("/internal/work/<work_id>/renew", method="POST")
    @worker_only
    @client_errors
    def renew(work_id: str) -> HTTPResponse:
        fields = worker_request()
        answer = store.renew(work_id, attempt_of(fields), fields["worker"])
        return lease_answer(work_id, answer, {"lease_seconds": store.lease_seconds})

    @app.route("/internal/work/<work_id>/release", method="POST")
    @worker_only
    @client_errors
    def release(work_id: str) -> HTTPResponse:
        fields = worker_request()
        return lease_answer(work_id, store.release(work_id, attempt_of(fields), fields["worker"]), {"released": True})

    @app.route("/internal/work/<work_id>/result", method="POST")
    @worker_only
    @client_errors
    def submit_result(work_id: str) -> HTTPResponse:
        fields = worker_request()
        result, duration = result_of(fields)
        answer = store.complete(work_id, fields["worker"], result, duration)
        metrics.result_answer(answer)
        if answer is LeaseAnswer.COMPLETED:
            return json_response({"stored": False})  # the first result stored wins; a repeat is no error
        return lease_answer(work_id, answer, {"stored": True})

    @app.route("/internal/claims", method="POST")
    @worker_only
    @client_errors
    def claims() -> HTTPResponse:
        return claim_jobs(store, worker_request(), limits)

    @app.route("/internal/claims/cancel", method="POST")
    @worker_only
    @client_errors
    def claims_cancel() -> HTTPResponse:
        return cancel_claim(store, worker_request())

    @app.route("/internal/leases/renew", method="POST")
    @worker_only
    @client_errors
    def leases_renew() -> HTTPResponse:
        return renew_leases(store, worker_request())

    @app.route("/internal/leases/release", method="POST")
    @worker_only
    @client_errors
    def leases_release() -> HTTPResponse:
        return release_leases(store, worker_request())

    @app.route("/internal/results", method="POST")
    @worker_only
    @client_errors
    def results() -> HTTPResponse:
        return submit_results(store, worker_request(), metrics)

    # -- peer API ------------------------------------------------------------------------

    @app.route("/internal/peer/take-completed", method="POST")
    @peer_only
    @client_errors
    def peer_take_completed() -> HTTPResponse:
        params = query_params(request.query_string)
        top = positive_int(params, "top", limits.max_top)
        results: list[Delivered] = store.take_completed(top, peer_delivery_token(params))
        return json_response(
            [{"id": item.work_id, "result": item.result, "completed_at": item.completed_at} for item in results]
        )

    @app.route("/internal/peer/give-back", method="POST")
    @peer_only
    @client_errors
    def peer_give_back() -> HTTPResponse:
        return json_response({"given_back": store.give_back(peer_delivery_token(query_params(request.query_string)))})

    @app.route("/internal/peer/work/<work_id>", method="GET")
    @peer_only
    @client_errors
    def peer_work_status(work_id: str) -> HTTPResponse:
        item = store.get(work_id) if owner_of(work_id) == store.node_id else None
        if item is None:
            return json_response({"error": f"no work item {work_id!r}"}, 404)
        return json_response(item_view(item))

    scaler_record.add_routes(app, store.history, requires(scalers_key), client_errors)
    metrics.add_routes(app)
    dashboard.add_routes(app, store, peer, operator_key(secret), peer_only, client_errors, instance_id)
    return app
