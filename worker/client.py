"""The worker's side of the endpoint's worker API, over one kept-alive HTTP connection."""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

_CLOSED_BY_SERVER = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
# Longer than the endpoint's wait for its store (5 s), which therefore always answers first: a
# write it has not done by then it does not do afterwards (see endpoint/writer.py).
HTTP_TIMEOUT_S = 10.0

# What a renew, release or result can hear (the endpoint's 409 "reason"s, and "done"):
LEASE_HELD = "done"
MOVED_ON = ("completed", "leased_elsewhere")  # the job is no longer ours: stop computing it
NOT_LEASED = "not_leased"  # the lease expired and nobody holds the item: a result still counts


class EndpointDown(Exception):
    """The endpoint did not answer, or answered with a server error: try again later."""


class Rejected(Exception):
    """The endpoint refused the request itself (bad secret, unknown item): retrying won't help."""


@dataclass(frozen=True)
class Job:
    endpoint: str
    work_id: str
    iterations: int
    attempt: int
    lease_seconds: float
    payload: bytes


class EndpointClient:
    """Not thread-safe: one per thread that talks to this endpoint."""

    def __init__(self, base_url: str, secret: str, worker_id: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"endpoint URL must look like http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout
        self._worker_id = worker_id
        self._auth = f"Bearer {secret}"
        self._conn: http.client.HTTPConnection | None = None
        self._unanswered_claim: str | None = None

    def claim(self) -> Job | None:
        """The next job, or None. A claim that got no answer is repeated with the same token by the
        next call, and the endpoint then hands back the lease that claim made, if it made one."""
        token = self._unanswered_claim or secrets.token_hex(16)
        self._unanswered_claim = token
        status, headers, body = self._post("/internal/claim", {"worker": self._worker_id, "claim": token})
        self._unanswered_claim = None
        if status == 204:
            return None
        if status != 200:
            raise Rejected(f"claim: HTTP {status}: {body[:200]!r}")
        return Job(
            endpoint=self.base_url,
            work_id=headers["X-Work-Id"],
            iterations=int(headers["X-Iterations"]),
            attempt=int(headers["X-Attempt"]),
            lease_seconds=float(headers["X-Lease-Seconds"]),
            payload=body,
        )

    def renew(self, job: Job) -> str:
        """LEASE_HELD, or why not: one of MOVED_ON, or NOT_LEASED."""
        return self._lease_call(job, "renew")

    def release(self, job: Job) -> str:
        return self._lease_call(job, "release")

    def submit(self, job: Job, result: str, duration_s: float) -> bool:
        """True if this result was stored, False if the item already had one (ours is dropped)."""
        fields = {"worker": self._worker_id, "result": result, "duration_s": round(duration_s, 6)}
        status, _, body = self._post(f"/internal/work/{quote(job.work_id)}/result", fields)
        if status != 200:
            raise Rejected(f"result for {job.work_id}: HTTP {status}: {body[:200]!r}")
        return bool(json.loads(body)["stored"])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _lease_call(self, job: Job, action: str) -> str:
        fields = {"worker": self._worker_id, "attempt": job.attempt}
        status, _, body = self._post(f"/internal/work/{quote(job.work_id)}/{action}", fields)
        if status == 409:
            try:
                reason = json.loads(body).get("reason")
            except (ValueError, AttributeError):
                reason = None
            return reason if reason in (*MOVED_ON, NOT_LEASED) else "leased_elsewhere"
        if status != 200:
            raise Rejected(f"{action} {job.work_id}: HTTP {status}: {body[:200]!r}")
        return LEASE_HELD

    def _post(self, path: str, fields: dict[str, object]) -> tuple[int, http.client.HTTPMessage, bytes]:
        body = json.dumps(fields).encode()
        headers = {"Authorization": self._auth, "Content-Type": "application/json"}
        reused = self._conn is not None
        for _ in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            try:
                self._conn.request("POST", path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # A kept-alive connection the server had closed fails at once, before the request
                # could do anything: one fresh try. A timeout is different -- the server may have
                # acted (a claim leased) -- so it is not repeated here.
                if reused and isinstance(exc, _CLOSED_BY_SERVER):
                    reused = False
                    continue
                raise EndpointDown(f"{self.base_url}: {exc}") from exc
            if response.will_close:
                self.close()
            if response.status >= 500:
                raise EndpointDown(f"{self.base_url}{path}: HTTP {response.status}")
            return response.status, response.headers, data
        raise EndpointDown(f"{self.base_url}: no answer")
