"""The worker API (the worker key): claims, leases and results.

Batches:  POST /internal/claims, /internal/claims/cancel, /internal/leases/{renew,release}, /internal/results
One job:  POST /internal/claim, /internal/work/<id>/{renew,release,result}

Every request is a JSON object naming its worker (`worker`); a bad field refuses the whole request
(400) and changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import bottle
from bottle import HTTPResponse, request

from endpoint.bridge import HOLD_HEADER
from endpoint.inputs import InputError
from endpoint.routing import Context, json_response
from endpoint.store import Claim, LeaseAnswer, WorkerReport

RESULT_PATTERN = re.compile(r"[0-9a-f]{128}")
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
CLAIM_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
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


def add_routes(app: bottle.Bottle) -> None:
    for path, route in (("/internal/claim", claim), ("/internal/work/<work_id>/renew", renew),
                        ("/internal/work/<work_id>/release", release), ("/internal/work/<work_id>/result", result),
                        ("/internal/claims", claims), ("/internal/claims/cancel", claims_cancel),
                        ("/internal/leases/renew", leases_renew), ("/internal/leases/release", leases_release),
                        ("/internal/results", results)):
        app.route(path, "POST", route, auth="worker")


# -- one job ---------------------------------------------------------------------------------

def claim(ctx: Context) -> HTTPResponse:
    fields = worker_request()
    claimed = ctx.store.claim(fields["worker"], claim_token_of(fields))
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


def renew(ctx: Context, work_id: str) -> HTTPResponse:
    fields = worker_request()
    answer = ctx.store.renew(work_id, attempt_of(fields), fields["worker"])
    return lease_response(ctx, work_id, answer, {"lease_seconds": ctx.store.lease_seconds})


def release(ctx: Context, work_id: str) -> HTTPResponse:
    fields = worker_request()
    return lease_response(ctx, work_id, ctx.store.release(work_id, attempt_of(fields), fields["worker"]),
                          {"released": True})


def result(ctx: Context, work_id: str) -> HTTPResponse:
    fields = worker_request()
    value, duration = result_of(fields)
    answer = ctx.store.complete(work_id, fields["worker"], value, duration)
    ctx.metrics.result_answer(answer)
    if answer is LeaseAnswer.COMPLETED:
        return json_response({"stored": False})  # the first result stored wins; a repeat is no error
    return lease_response(ctx, work_id, answer, {"stored": True})


def lease_response(ctx: Context, work_id: str, answer: LeaseAnswer, done: dict[str, Any]) -> HTTPResponse:
    """The one answer of renew, release and result: done, moved on (409 with a reason), or 404."""
    if answer is LeaseAnswer.DONE:
        return json_response(done)
    if answer is LeaseAnswer.NO_SUCH_ITEM:
        raise InputError(404, f"no work item {work_id!r} at endpoint {ctx.store.node_id!r}")
    return json_response({"error": f"lease lost: {LEASE_LOST[answer]}", "reason": answer.value}, 409)


# -- batches ---------------------------------------------------------------------------------

def claims(ctx: Context) -> HTTPResponse:
    fields = worker_request()
    token = claim_token_of(fields)
    if token is None:
        raise InputError(400, "field 'claim' is required: the worker's name for this claim")
    store = ctx.store
    max_bytes = bounded_int(fields, "max_bytes", ctx.limits.max_payload_bytes, 1, 1 << 31)
    batch = store.claim_batch(fields["worker"], token, bounded_int(fields, "max_jobs", 1, 1, MAX_CLAIM_JOBS),
                              max_bytes, bounded_seconds(fields, "wait_s", MAX_CLAIM_WAIT_S), worker_report(fields))
    return jobs_response(batch.claims, batch.pending, batch.waited, store.lease_seconds, batch.hold)


def claims_cancel(ctx: Context) -> HTTPResponse:
    fields = worker_request()
    token = claim_token_of(fields)
    if token is None:
        raise InputError(400, "field 'claim' is required")
    return json_response({"released": ctx.store.cancel_claim(fields["worker"], token)})


def leases_renew(ctx: Context) -> HTTPResponse:
    fields = worker_request()
    answers = ctx.store.renew_batch(fields["worker"], lease_batch(fields))
    return json_response({"answers": [answer.value for answer in answers], "lease_seconds": ctx.store.lease_seconds})


def leases_release(ctx: Context) -> HTTPResponse:
    fields = worker_request()
    answers = ctx.store.release_batch(fields["worker"], lease_batch(fields))
    return json_response({"answers": [answer.value for answer in answers]})


def results(ctx: Context) -> HTTPResponse:
    """Each result on its own: "done" (stored), "completed" (the item had a result already: the first
    stored wins, ours is dropped) or "no_such_item"."""
    fields = worker_request()
    items = batch_items(fields, "results")
    checked = checked_items(items, "results", result_of)
    answers = ctx.store.complete_batch(fields["worker"], [(item["id"], value, duration) for item, (value, duration)
                                                          in zip(items, checked, strict=True)])
    for answer in answers:
        ctx.metrics.result_answer(answer)
    return json_response({"answers": [answer.value for answer in answers]})


def jobs_response(claimed: list[Claim], pending: int, waited: bool, lease_seconds: float,
                  hold: str = "") -> HTTPResponse:
    """A batch of jobs: one line of JSON that describes them, then their payloads back to back. With
    `hold`, the request reader holds the answer until work arrives (endpoint/bridge.py)."""
    manifest = {
        "jobs": [{"id": job.work_id, "iterations": job.iterations, "attempt": job.attempt,
                  "payload_bytes": len(job.payload)} for job in claimed],
        "lease_seconds": lease_seconds,
        "pending": pending,
        "waited": waited,
    }
    body = b"".join([json.dumps(manifest).encode(), b"\n", *(job.payload for job in claimed)])
    headers = {"Content-Type": JOBS_CONTENT_TYPE, **({HOLD_HEADER.decode(): hold} if hold else {})}
    return HTTPResponse(body, status=200, headers=headers)


# -- reading a worker's request --------------------------------------------------------------

def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number here")


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
    value = fields.get("result")
    if not isinstance(value, str) or not RESULT_PATTERN.fullmatch(value):
        raise InputError(400, "field 'result' must be 128 lowercase hex digits")
    duration = fields.get("duration_s")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not 0 <= duration < 1e7):
        raise InputError(400, "field 'duration_s' must be a number of seconds, 0 or more")
    return value, duration


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


def lease_batch(fields: dict[str, Any]) -> list[tuple[str, int]]:
    items = batch_items(fields, "leases")
    return list(zip((item["id"] for item in items), checked_items(items, "leases", attempt_of), strict=True))


def worker_report(fields: dict[str, Any]) -> WorkerReport | None:
    """What a claiming worker says of itself (optional, all three fields or none)."""
    if "kernel" not in fields:
        return None
    kernel = fields["kernel"]
    if not isinstance(kernel, str) or not KERNEL_PATTERN.fullmatch(kernel):
        raise InputError(400, "field 'kernel' must be 1-16 characters of [a-z0-9_]")
    processes = bounded_int(fields, "processes", 0, 1, 4096)
    return WorkerReport(kernel, processes, bounded_int(fields, "capacity", 0, 1, 1 << 20))
