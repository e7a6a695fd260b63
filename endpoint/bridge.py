"""Reading requests off the network before the application sees them.

The server hands each request to this reader (an ASGI application): it collects the body on
the event loop, within a size and a time limit, and refuses a body that ends before its
`Content-Length` or before its last chunk. Only a complete request reaches the Bottle (WSGI)
application, on one of its threads. So a client that is slow to send holds a connection for
at most the time limit, and never one of the threads that serve /stats, enqueues and claims.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from endpoint.inputs import InputError

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
Observe = Callable[[dict[str, Any], int, float], None]  # (environ, status, seconds since the headers arrived)

# Sent by the server's supervisor to the app process before it stops it (endpoint/server.py).
STOP_READING = signal.SIGUSR1
# An answer the app asks to hold back until there is news (a claim that waits for work): the app
# sets this header to "<generation> <seconds> <holder>"; the reader takes it off and sends the answer
# once `news` moved past that generation, the seconds passed, or the server stops. It waits on the
# event loop, so a held answer holds none of the app's threads.
HOLD_HEADER = b"x-hold-for-news"
# A held answer goes out this long after the news, not at once: work that arrives in a stream
# (an enqueue every millisecond) then reaches the waiting worker as a batch, one claim for many
# jobs, rather than one claim per job.
GATHER_S = 0.005


class News(Protocol):
    """What held answers wait for (endpoint/waiting.py's WorkSignal)."""

    def listen(self, since: int, holder: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from any thread) once the generation is past `since`; returns an unlisten."""

    def leave(self, holder: str) -> None:
        """The answer held for `holder` is sent."""
_JSON = (b"content-type", b"application/json")
# The body is complete when the app sees it: it reads the length it got, not what was announced.
_BODY_HEADERS = frozenset({"CONTENT_LENGTH", "TRANSFER_ENCODING"})


@dataclass(frozen=True)
class ReadLimits:
    max_body_bytes: int
    body_timeout_s: float


class RequestReader:
    """Reads each request completely, then answers it with the WSGI app on one of `threads` threads."""

    def __init__(self, app: WsgiApp, limits: ReadLimits, threads: int, observe: Observe | None = None,
                 news: News | None = None) -> None:
        self.app = app
        self.limits = limits
        self.observe = observe or _ignore
        self.news = news
        self.holding: set[asyncio.Future[None]] = set()
        self.stopping = False  # once stopping, answers are no longer held: the server drains
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="request")
        self.finished = _Finished()
        self.reading: dict[asyncio.Task[Any], Callable[[InputError], None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        try:
            body = await self._read_in_time(scope, receive)
        except InputError as refusal:
            await _send(send, error_answer(refusal.status, refusal.message, close=True))
            self.observe({"REQUEST_METHOD": scope["method"]}, refusal.status, time.perf_counter() - started)
            return
        await self._answer(wsgi_environ(scope, body), send, receive, started)

    async def _read_in_time(self, scope: Scope, receive: Receive) -> bytes:
        # A timer that cancels this task, rather than asyncio.wait_for, which runs the read as a
        # task of its own: one more turn of the event loop for every request.
        task = asyncio.current_task()
        assert task is not None
        refusal: list[InputError] = []

        def stop(reason: InputError) -> None:
            if not refusal:
                refusal.append(reason)
                task.cancel()

        timeout = self.limits.body_timeout_s
        timer = asyncio.get_running_loop().call_later(
            timeout, stop, InputError(408, f"request body not received within {timeout:g} s"))
        self.reading[task] = stop
        try:
            return await read_body(scope, receive, self.limits.max_body_bytes)
        except asyncio.CancelledError:
            if not refusal:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
                task.uncancel()
            # Popped, not kept in a name: a refusal that this frame still referred to would form a
            # reference cycle (frame, exception, traceback) that keeps granian's request, and so
            # the connection, open until the garbage collector happens to run.
            raise refusal.pop() from None
        finally:
            timer.cancel()
            del self.reading[task]

    def stop_reading(self) -> None:
        """Answer every request still being read with 503: the server is stopping, and it waits for
        each request in progress before it exits, so a slow client would hold it up."""
        for stop in list(self.reading.values()):
            stop(InputError(503, "the endpoint is shutting down: send the request again"))
        self.stopping = True
        for held in list(self.holding):  # held answers go out now
            _resolve(held)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # granian's own SIGTERM handler is on the loop by now; STOP_READING is this one's.
                asyncio.get_running_loop().add_signal_handler(STOP_READING, self.stop_reading)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _answer(self, environ: dict[str, Any], send: Send, receive: Receive, started: float) -> None:
        """The app answers on a thread of the pool, and that thread hands the answer to the server
        itself: granian's `send` of a complete response is plain synchronous Rust (it returns an
        awaitable that is already done), so the answer does not wait for the event loop. The
        loop hears afterwards that the request is over, many requests at a time under load."""
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held: list[tuple[Answer, str]] = []

        def run() -> None:
            try:
                answer = call_wsgi(self.app, environ)
            except Exception:
                log.exception("request failed: %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
                answer = error_answer(500, "internal error")
            try:
                answer, hold = _without_hold(answer)
                if hold and self.news is not None:
                    held.append((answer, hold))  # sent from the event loop, after the hold
                else:
                    _send_now(send, answer)
            finally:
                self.finished.add(finished)
            self.observe(environ, answer[0], time.perf_counter() - started)

        self.pool.submit(run)
        await finished
        if held:
            answer, hold = held[0]
            await self._hold(hold, receive)
            _send_now(send, answer)

    async def _hold(self, hold: str, receive: Receive) -> None:
        """Until news past the generation, the time is up, the client goes away, or the server stops.
        A client that went away (its worker was killed) is no longer one to tell the news to."""
        assert self.news is not None
        generation, seconds, holder = hold.split(" ", 2)
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(float(seconds), _resolve, woken)
        unlisten = self.news.listen(int(generation), holder, lambda: loop.call_soon_threadsafe(
            loop.call_later, GATHER_S, _resolve, woken))
        # The body has been read: the next message of the request is the client's disconnect.
        gone = asyncio.ensure_future(receive())
        gone.add_done_callback(lambda _: _resolve(woken))
        self.holding.add(woken)
        try:
            if not self.stopping:
                await woken
        finally:
            timer.cancel()
            unlisten()
            gone.cancel()
            self.holding.discard(woken)
            self.news.leave(holder)


def _ignore(environ: dict[str, Any], status: int, seconds: float) -> None:
    pass


class _Finished:
    """Requests answered on pool threads, handed back to the event loop in batches: one wake-up
    of the loop for all the requests that finished since the last one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[asyncio.Future[None]] = []

    def add(self, future: asyncio.Future[None]) -> None:
        with self._lock:
            self._waiting.append(future)
            first = len(self._waiting) == 1
        if first:
            future.get_loop().call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        with self._lock:
            done, self._waiting = self._waiting, []
        for future in done:
            if not future.done():  # cancelled meanwhile, e.g. at shutdown
                future.set_result(None)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body: 413 past `limit` (before reading when the length is announced), 400 when cut off."""
    announced, chunked = _framing(scope)
    if announced is not None and announced > limit:
        raise InputError(413, f"request body of {announced} bytes is over the limit of {limit} bytes")
    if not announced and not chunked:
        return b""  # no body (HTTP/1.1: neither a length nor chunks), nothing to wait for
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the server's word for a body that broke off
            raise InputError(400, _cut_off(received, announced))
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise InputError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if announced is not None and received != announced:
        raise InputError(400, _cut_off(received, announced))
    return b"".join(chunks)


def _cut_off(received: int, announced: int | None) -> str:
    if announced is None:
        return f"request body cut off: the chunked body ended before its last chunk, after {received} bytes"
    return f"request body cut off: {received} of the {announced} bytes announced by Content-Length arrived"


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The announced Content-Length, and whether the body comes in chunks."""
    announced, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length":
            announced = int(value)  # the server refused malformed and conflicting lengths with 400 already
        elif name == b"transfer-encoding":
            chunked = True  # the server refused every coding but chunked with 400 already
    return announced, chunked


def wsgi_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of a request whose body has been read."""
    server_host, server_port = scope.get("server") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(scope["raw_path"]).decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": server_host,
        "SERVER_PORT": str(server_port),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "REMOTE_ADDR": (scope.get("client") or ("", 0))[0],
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name in _BODY_HEADERS:
            continue
        key = name if name == "CONTENT_TYPE" else f"HTTP_{name}"
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call_wsgi(app: WsgiApp, environ: dict[str, Any]) -> Answer:
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started[:] = [status, headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        content = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    status, headers = started
    encoded = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    return int(status.split(" ", 1)[0]), encoded, content


def error_answer(status: int, message: str, close: bool = False) -> Answer:
    # close: the rest of a refused body may still be on its way, so the connection cannot be reused.
    headers = [_JSON, (b"connection", b"close")] if close else [_JSON]
    return status, headers, json.dumps({"error": message}).encode()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _without_hold(answer: Answer) -> tuple[Answer, str]:
    """The answer without the hold header, and that header's value ("": not to be held)."""
    status, headers, content = answer
    hold = next((value.decode("latin-1") for name, value in headers if name == HOLD_HEADER), "")
    if not hold:
        return answer, ""
    return (status, [(name, value) for name, value in headers if name != HOLD_HEADER], content), hold


async def _send(send: Send, answer: Answer) -> None:
    status, headers, content = answer
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def _send_now(send: Send, answer: Answer) -> None:
    status, headers, content = answer
    for message in ({"type": "http.response.start", "status": status, "headers": headers},
                    {"type": "http.response.body", "body": content}):
        send(message)  # an already-done awaitable (see RequestReader._answer): nothing to wait for

