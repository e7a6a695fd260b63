"""A stand-in for EC2's instance metadata service, IMDSv2 only, for the Spot interruption tests.

It answers what a Spot worker asks (worker/interruption.py): PUT /latest/api/token (with the TTL
header) hands out a session token, and GET /latest/meta-data/spot/instance-action with a valid
token answers 404 until the test interrupts that caller, then EC2's JSON notice. A read without
a token, or with an unknown one, is 401, as with IMDSv2 required; `expire_tokens()` makes every
token given so far invalid, as a restart of the service would. Callers are told apart by their
address, so that one server serves every fake host of a HostNetwork (each its own address);
`interrupt()` without an address interrupts every caller. It listens on loopback or on a
HostNetwork's gateway, from a thread, for as long as the `with` block.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import reply, serving

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"


@dataclass
class Metadata:
    """What the service knows and what it was asked."""

    tokens: set[str] = field(default_factory=set)
    notices: dict[str, bytes] = field(default_factory=dict)  # caller address ("*": every caller) -> body
    reads: list[tuple[str, str, int]] = field(default_factory=list)  # (address, path, status answered)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def interrupt(self, seconds: float, address: str = "*", body: bytes | None = None) -> float:
        """From now on, the notice that the instance is taken in `seconds`; returns that unix time."""
        deadline = time.time() + seconds
        stamp = datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.lock:
            self.notices[address] = body if body is not None else json.dumps(
                {"action": "terminate", "time": stamp}).encode()
        return deadline

    def calm(self, address: str = "*") -> None:
        """No notice for `address` any more (a new instance at that address)."""
        with self.lock:
            self.notices.pop(address, None)

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def notice_reads(self, address: str | None = None) -> list[int]:
        """The statuses answered to reads of the notice (by `address`, or by anyone)."""
        with self.lock:
            return [status for caller, path, status in self.reads
                    if path == NOTICE_PATH and (address is None or caller == address)]


def _handler(metadata: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _answer(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
            with metadata.lock:
                metadata.reads.append((self.client_address[0], self.path, status))
            reply(self, status, content_type, body)

        def do_PUT(self) -> None:  # noqa: N802 -- http.server's name
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if self.path != TOKEN_PATH:
                self._answer(404)
            elif not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                self._answer(400)
            else:
                token = secrets.token_urlsafe(24)
                with metadata.lock:
                    metadata.tokens.add(token)
                self._answer(200, token.encode())

        def do_GET(self) -> None:  # noqa: N802
            with metadata.lock:
                known = self.headers.get("X-aws-ec2-metadata-token", "") in metadata.tokens
                notice = metadata.notices.get(self.client_address[0], metadata.notices.get("*"))
            if not known:
                self._answer(401)
            elif self.path != NOTICE_PATH or notice is None:
                self._answer(404)
            else:
                self._answer(200, notice, "application/json")

    return Handler


@contextmanager
def metadata_service(host: str = "127.0.0.1") -> Iterator[tuple[str, Metadata]]:
    """(its URL, its state) while the block runs."""
    metadata = Metadata()
    server = ThreadingHTTPServer((host, 0), _handler(metadata))
    server.daemon_threads = True
    with serving(server) as url:
        yield url, metadata
