"""The worker's side of the endpoint's worker API (batches), over one kept-alive HTTP connection.

    client = EndpointClient("http://127.0.0.1:5000", worker_key, "worker-1")
    answer = client.claim(max_jobs=8, wait_s=20, report={"kernel": "avx512", "processes": 2, "capacity": 16})
    client.renew(answer.jobs)                       # one answer per job: LEASE_HELD, MOVED_ON..., NOT_LEASED
    client.submit([(job, result_hex, seconds)])     # one answer per result: STORED, ALREADY_COMPLETED, ...

Standard library only, so that a simulated fleet (or a test) can drive the endpoints the way
the worker does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cli.tls import client_context

_CLOSED_BY_SERVER = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
# Longer than the endpoint's wait for its store (5 s), which therefore always answers first: a
# write it has not done by then it does not do afterwards (see endpoint/writer.py). A claim that
# waits for work gets its wait on top.
HTTP_TIMEOUT_S = 10.0

# What a renew or release can hear for each job (the store's LeaseAnswer values):
LEASE_HELD = "done"
MOVED_ON = ("completed", "leased_elsewhere")  # the job is no longer ours: stop computing it
NOT_LEASED = "not_leased"  # the lease expired and nobody holds the item: a result still counts
NO_SUCH_ITEM = "no_such_item"
# ... and for each result:
STORED = "done"
ALREADY_COMPLETED = "completed"  # the item had a result already: the first one stored wins, ours is dropped


class EndpointDown(Exception):
    """The endpoint did not answer, or answered with a server error: try again later."""


class ClaimCalledOff(EndpointDown):
    """The worker called its claim off (call_off_claim()) before the answer came: what the claim took, if
    anything, is given back by cancel_unanswered()."""


class Rejected(Exception):
    """The endpoint refused the request itself (bad key, bad request): retrying won't help."""


@dataclass(frozen=True)
class Job:
    endpoint: str
    work_id: str
    iterations: int
    attempt: int
    lease_seconds: float
    payload: bytes

    @property
    def key(self) -> tuple[str, str]:
        return self.endpoint, self.work_id


@dataclass(frozen=True)
class ClaimAnswer:
    jobs: list[Job]
    pending: int  # items the endpoint still had pending
    waited: bool  # False: the endpoint could not let this claim wait (too many waiting): back off


class EndpointClient:
    """Not thread-safe: one per thread that talks to this endpoint (abort() may come from any)."""

    def __init__(self, base_url: str, worker_key: str, worker_id: str, timeout: float = HTTP_TIMEOUT_S,
                 ca_file: str = "") -> None:
        """An https endpoint is checked against `ca_file` (the cluster's CA), else the system's CAs."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint URL must look like https://host:port or http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._tls = client_context(ca_file) if parts.scheme == "https" else None
        self._port = parts.port or (443 if self._tls else 80)
        self._timeout = timeout
        self._worker_id = worker_id
        self._auth = f"Bearer {worker_key}"
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._calling_off = False  # call_off_claim(): the claim in progress (or the next) is broken off
        self._connecting = threading.Lock()  # abort() shuts down every socket connected after it
        self.unanswered_claim: str | None = None

    def claim(self, max_jobs: int = 1, max_bytes: int = 0, wait_s: float = 0.0,
              report: dict[str, object] | None = None) -> ClaimAnswer:
        """Up to `max_jobs` jobs, waiting up to `wait_s` for work at the endpoint. A claim that got no
        answer is repeated with the same token by the next call, and the endpoint then hands back
        the leases that claim made, if it made them (cancel_unanswered() gives them back instead)."""
        token = self.unanswered_claim or secrets.token_hex(16)
        self.unanswered_claim = token
        fields: dict[str, object] = {"worker": self._worker_id, "claim": token, "max_jobs": max_jobs,
                                     "wait_s": wait_s, **(report or {})}
        if max_bytes:
            fields["max_bytes"] = max_bytes
        try:
            status, body = self._post("/internal/claims", fields, self._timeout + wait_s, interruptible=True)
        except EndpointDown as exc:
            if self._called_off():
                raise ClaimCalledOff(f"{self.base_url}: the claim was called off") from exc
            raise
        self._called_off()  # too late to call it off: its answer is here
        if status != 200:
            raise Rejected(f"claim: HTTP {status}: {body[:200]!r}")
        answer = parse_jobs(self.base_url, body)
        self.unanswered_claim = None
        return answer

    def cancel_unanswered(self) -> int:
        """Call off a claim that got no answer (the worker stops): if it still waits at the endpoint,
        it ends without taking anything; what it took is given back. Returns the jobs given back."""
        token = self.unanswered_claim
        if token is None:
            return 0
        status, body = self._post("/internal/claims/cancel", {"worker": self._worker_id, "claim": token})
        if status != 200:
            raise Rejected(f"cancel claim: HTTP {status}: {body[:200]!r}")
        self.unanswered_claim = None
        return int(json.loads(body)["released"])

    def renew(self, jobs: Sequence[Job]) -> list[str]:
        """For each job LEASE_HELD, or why not: one of MOVED_ON, NOT_LEASED or NO_SUCH_ITEM."""
        return self._per_job("/internal/leases/renew", "leases",
                             [{"id": job.work_id, "attempt": job.attempt} for job in jobs])

    def release(self, jobs: Sequence[Job]) -> list[str]:
        """Give jobs back (the worker stops): for each LEASE_HELD (given back) or why not."""
        return self._per_job("/internal/leases/release", "leases",
                             [{"id": job.work_id, "attempt": job.attempt} for job in jobs])

    def submit(self, results: Sequence[tuple[Job, str, float]]) -> list[str]:
        """Results (job, hex, seconds): for each STORED, ALREADY_COMPLETED or NO_SUCH_ITEM."""
        return self._per_job("/internal/results", "results",
                             [{"id": job.work_id, "result": result, "duration_s": round(seconds, 6)}
                              for job, result, seconds in results])

    def leaving(self, reason: str, left: bool, seconds_left: float) -> None:
        """Tell the endpoint that this worker is leaving (`reason`: a Spot interruption), or has left."""
        status, body = self._post("/internal/leaving", {"worker": self._worker_id, "reason": reason, "left": left,
                                                        "seconds_left": max(0.0, round(seconds_left, 3))})
        if status != 200:
            raise Rejected(f"leaving: HTTP {status}: {body[:200]!r}")

    def abort(self) -> None:
        """From another thread: break off the request in progress (a claim waiting for work), and
        send no more, until resume()."""
        with self._connecting:
            self._aborted = True
            conn = self._conn
            sock = conn.sock if conn is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):  # closed already
                    sock.shutdown(socket.SHUT_RDWR)

    def call_off_claim(self) -> None:
        """From another thread: break off the claim in progress (its worker has no lane free for what it
        would bring, nor soon): claim() raises ClaimCalledOff, and a claim not yet sent is not sent."""
        with self._connecting:
            self._calling_off = True
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _called_off(self) -> bool:
        with self._connecting:
            called_off, self._calling_off = self._calling_off, False
            return called_off

    def resume(self) -> None:
        """Requests go out again after an abort() (calling off the claim it broke off, say)."""
        self._aborted = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._tls is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._tls)

    def _per_job(self, path: str, name: str, items: list[dict[str, object]]) -> list[str]:
        status, body = self._post(path, {"worker": self._worker_id, name: items})
        if status != 200:
            raise Rejected(f"{path}: HTTP {status}: {body[:200]!r}")
        answers = json.loads(body)["answers"]
        if len(answers) != len(items):
            raise Rejected(f"{path}: {len(answers)} answers to {len(items)} items")
        return [str(answer) for answer in answers]

    def _post(self, path: str, fields: dict[str, object], timeout: float | None = None,
              interruptible: bool = False) -> tuple[int, bytes]:
        body = json.dumps(fields).encode()
        headers = {"Authorization": self._auth, "Content-Type": "application/json"}
        reused = self._conn is not None
        for _ in range(2):
            try:
                with self._connecting:
                    if self._aborted or (interruptible and self._calling_off):
                        raise EndpointDown(f"{self.base_url}: the request was called off")
                    if self._conn is None:
                        self._conn = self._connection()
                    if self._conn.sock is None:
                        self._conn.connect()
                self._conn.sock.settimeout(timeout or self._timeout)
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
            return response.status, data
        raise EndpointDown(f"{self.base_url}: no answer")


def parse_jobs(endpoint: str, body: bytes) -> ClaimAnswer:
    """A claim's answer: one line of JSON describing the jobs, then their payloads back to back."""
    line_end = body.find(b"\n")
    try:
        manifest = json.loads(body[:line_end] if line_end >= 0 else body)
        jobs, offset = [], line_end + 1
        lease_seconds = float(manifest["lease_seconds"])
        for entry in manifest["jobs"]:
            size = int(entry["payload_bytes"])
            payload = body[offset:offset + size]
            if len(payload) != size:
                raise ValueError("payloads shorter than announced")
            offset += size
            jobs.append(Job(endpoint, str(entry["id"]), int(entry["iterations"]), int(entry["attempt"]),
                            lease_seconds, payload))
        return ClaimAnswer(jobs, int(manifest["pending"]), bool(manifest["waited"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointDown(f"{endpoint}: a claim's answer that is not a batch of jobs: {exc}") from exc
