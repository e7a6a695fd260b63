"""What a careless or hostile client does on the wire: cut-off bodies, slow clients, HTTP/2,
requests the HTTP core refuses. Raw sockets, so that the bytes sent are exactly these."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import WORKER_AUTH, Endpoint, Services

BODY_TIMEOUT = 5
HEADER_TIMEOUT = 2
THREADS = 16


@pytest.fixture
def endpoint(services: Services) -> Iterator[Endpoint]:
    yield services.endpoint("a", extra_args=("--body-timeout", str(BODY_TIMEOUT), "--header-timeout",
                                             str(HEADER_TIMEOUT), "--threads", str(THREADS)))


def stored(endpoint: Endpoint) -> list[tuple[str, bytes]]:
    with sqlite3.connect(endpoint.db) as conn:
        return conn.execute("SELECT w.id, p.data FROM work_items w JOIN payloads p ON p.seq = w.seq").fetchall()


def exchange(endpoint: Endpoint, data: bytes, half_close: bool = True, timeout: float = 10) -> bytes:
    """Send `data`, optionally shut down the sending side (the client is done), read the answer."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_json_error(raw: bytes, status: int, mentions: str) -> None:
    assert raw, "the server closed the connection without an answer"
    code, headers, body = parse_answer(raw)
    assert code == status, raw
    assert headers["content-type"].startswith("application/json"), raw
    assert mentions in json.loads(body)["error"], raw


def put_head(length_header: str, content_type: str = "application/octet-stream") -> bytes:
    return (f"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"{length_header}\r\n\r\n").encode()


CUT_OFF = {
    "raw": put_head("Content-Length: 1000") + b"0123456789abcdef",
    "chunked": put_head("Transfer-Encoding: chunked") + b"10\r\nPARTIAL",
    "chunked-between-chunks": put_head("Transfer-Encoding: chunked") + b"7\r\nPARTIAL\r\n",
    "form": put_head("Content-Length: 500", "application/x-www-form-urlencoded") + b"data=amount%3D100",
    "multipart": put_head("Content-Length: 300", "multipart/form-data; boundary=zz")
    + b'--zz\r\nContent-Disposition: form-data; name="data"\r\n\r\nhalf of a fi',
}


@pytest.mark.parametrize("request_bytes", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_cut_off_body_is_refused_and_nothing_is_stored(endpoint: Endpoint, request_bytes: bytes) -> None:
    answer = exchange(endpoint, request_bytes)
    assert_json_error(answer, 400, "cut off")
    assert stored(endpoint) == []


def test_complete_body_sent_in_pieces_is_stored(endpoint: Endpoint) -> None:
    """The counterpart of the cut-off cases: pauses are not the end of a body."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as sock:
        sock.sendall(put_head("Transfer-Encoding: chunked"))
        for piece in (b"7\r\nPARTIAL\r\n", b"5\r\n BODY\r\n", b"0\r\n\r\n"):
            time.sleep(0.3)
            sock.sendall(piece)
        code, _, body = parse_answer(sock.recv(65536))
    assert code == 200, body
    assert stored(endpoint) == [(json.loads(body)["id"], b"PARTIAL BODY")]


class SlowClients:
    """Connections that send a request's headers, announce a body of 100 bytes, and send none."""

    def __init__(self, endpoint: Endpoint, count: int) -> None:
        self.sockets = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=30)
            sock.sendall(put_head("Content-Length: 100"))
            self.sockets.append(sock)

    def answers(self) -> list[bytes]:
        return [read_until_closed(sock) for sock in self.sockets]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.mark.parametrize("count", [THREADS, 3 * THREADS])
def test_slow_clients_do_not_starve_the_endpoint(endpoint: Endpoint, count: int) -> None:
    slow = SlowClients(endpoint, count)
    try:
        time.sleep(0.5)  # every one of them is inside the server, waiting for its body
        started = time.monotonic()
        # Each of these timed out (no answer within 5 s) while 16 slow clients were connected.
        assert endpoint.stats()["pending"] == 0
        work_id = endpoint.enqueue(b"served while slow clients wait", 3)
        claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "w"}, headers=WORKER_AUTH,
                              timeout=5)
        assert claim.status_code == 200 and claim.headers["X-Work-Id"] == work_id
        assert time.monotonic() - started < BODY_TIMEOUT, "served only after the slow clients timed out"
        # The slow ones are told what went wrong once the body time limit passes.
        for answer in slow.answers():
            assert_json_error(answer, 408, f"within {BODY_TIMEOUT} s")
    finally:
        slow.close()
    assert [work_id for work_id, _ in stored(endpoint)] == [work_id]


def test_a_body_that_trickles_in_has_a_time_limit_for_all_of_it(endpoint: Endpoint) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=30) as sock:
        sock.sendall(put_head("Content-Length: 100"))
        started = time.monotonic()
        try:
            for _ in range(100):  # a byte every 0.2 s would take 20 s
                sock.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass  # the server gave up on us and closed the connection
        answer = read_until_closed(sock)
    assert_json_error(answer, 408, "not received")
    assert time.monotonic() - started < BODY_TIMEOUT + 2
    assert stored(endpoint) == []


@pytest.mark.parametrize("sent", [b"", b"GET /stats HTTP/1.1\r\nHost: test\r\n"], ids=["nothing", "half-headers"])
def test_a_connection_that_sends_no_complete_headers_is_closed(endpoint: Endpoint, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=HEADER_TIMEOUT + 10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        answer = read_until_closed(sock)  # blocks until the server closes the connection
    assert answer == b""  # the HTTP core closes it without an answer (README, "Errors")
    assert time.monotonic() - started < HEADER_TIMEOUT + 3


def test_http2_is_not_spoken_and_stores_nothing(endpoint: Endpoint, tmp_path: Path) -> None:
    """HTTP/2 is off. Before, a streamed HTTP/2 upload was stored as an empty payload."""
    upload = tmp_path / "upload"
    upload.write_bytes(b"streamed over HTTP/2")
    direct = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-X", "PUT", "-T", str(upload),
                             f"{endpoint.url}/enqueue?iterations=1"], capture_output=True, timeout=30)
    assert direct.returncode != 0, direct.stdout
    assert stored(endpoint) == []
    # Asked to upgrade, the server answers in HTTP/1.1, and the body is read as such.
    upgraded = subprocess.run(["curl", "-sS", "--fail-with-body", "--http2", "-X", "PUT", "-T", str(upload),
                               "-w", "\n%{http_version}", f"{endpoint.url}/enqueue?iterations=1"],
                              capture_output=True, timeout=30, check=True)
    answer, version = upgraded.stdout.decode().rsplit("\n", 1)
    assert version == "1.1"
    assert stored(endpoint) == [(json.loads(answer)["id"], upload.read_bytes())]


# What the HTTP core (granian's, before the app) refuses with an empty body; the README lists these.
HTTP_CORE_REFUSALS = {
    "negative-length": (put_head("Content-Length: -1"), 400),
    "two-lengths": (put_head("Content-Length: 3\r\nContent-Length: 4") + b"abcd", 400),
    "unknown-transfer-coding": (put_head("Transfer-Encoding: gzip") + b"abc", 400),
    "malformed-request-line": (b"NOT HTTP\r\n\r\n", 400),
    "many-headers": (b"GET /stats HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120))
                     + b"\r\n", 431),
    "long-url": (b"GET /stats?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
}


@pytest.mark.parametrize(("request_bytes", "status"), HTTP_CORE_REFUSALS.values(), ids=HTTP_CORE_REFUSALS.keys())
def test_requests_the_http_core_refuses(endpoint: Endpoint, request_bytes: bytes, status: int) -> None:
    code, headers, body = parse_answer(exchange(endpoint, request_bytes, half_close=False))
    assert (code, body) == (status, b"")
    assert headers["connection"] == "close"
    assert stored(endpoint) == []


def test_errors_of_the_request_reader_are_json(endpoint: Endpoint) -> None:
    # Over the size limit, announced: refused before the body is sent.
    answer = exchange(endpoint, put_head("Content-Length: 999999999"), half_close=False)
    assert_json_error(answer, 413, "over the limit")
    # Over the limit, chunked: refused once the limit is passed.
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"c" * 100_000

    response = requests.put(f"{endpoint.url}/enqueue?iterations=1", data=chunks(), timeout=30)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    assert stored(endpoint) == []


def test_pipelined_requests_on_one_connection_are_each_answered(endpoint: Endpoint) -> None:
    """Reading whole bodies first must not lose the requests behind them on a connection."""
    first = put_head("Content-Length: 5") + b"first"
    second = put_head("Content-Length: 6").replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n") + b"second"
    answers = exchange(endpoint, first + second, half_close=False)
    assert answers.count(b"HTTP/1.1 200 OK") == 2, answers
    assert sorted(data for _, data in stored(endpoint)) == [b"first", b"second"]


def test_many_concurrent_clients_all_get_their_own_answer(endpoint: Endpoint) -> None:
    results: dict[int, str] = {}

    def client(index: int) -> None:
        payload = f"client {index}".encode()
        response = requests.put(f"{endpoint.url}/enqueue?iterations=2", data=payload, timeout=30,
                                headers={"Content-Type": "application/octet-stream"})
        results[index] = response.json()["id"]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_id = dict(stored(endpoint))
    assert {index: by_id[work_id] for index, work_id in results.items()} == {
        index: f"client {index}".encode() for index in range(64)}


def test_a_slow_client_does_not_hold_up_a_stop(endpoint: Endpoint) -> None:
    """The server waits for the requests in progress before it exits; one still being read is
    answered 503 at once instead of holding the stop up for --body-timeout."""
    slow = SlowClients(endpoint, 3)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        endpoint.service.stop()  # SIGTERM to the whole process group, as Ctrl-C or systemd would
        assert time.monotonic() - started < BODY_TIMEOUT
        for answer in slow.answers():
            assert_json_error(answer, 503, "shutting down")
    finally:
        slow.close()
    assert stored(endpoint) == []
