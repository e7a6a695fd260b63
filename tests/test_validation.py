"""Bad input gets a 4xx JSON error that says what is wrong, and changes nothing."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
from collections.abc import Iterator

import pytest
import requests

from conftest import PEER_AUTH, SECRET, WORKER_AUTH, Endpoint, Services

MAX_PAYLOAD = 1024
MAX_ITERATIONS = 1000
MAX_TOP = 50


@pytest.fixture
def endpoint(services: Services) -> Iterator[Endpoint]:
    yield services.endpoint("a", extra_args=("--max-payload-bytes", str(MAX_PAYLOAD), "--max-iterations",
                                             str(MAX_ITERATIONS), "--max-top", str(MAX_TOP)))


def snapshot(endpoint: Endpoint) -> tuple:
    """Everything the store holds, to compare before and after a rejected request."""
    with sqlite3.connect(endpoint.db) as conn:
        items = conn.execute("SELECT id, state, attempts, result, delivered_at FROM work_items ORDER BY seq").fetchall()
        payloads = conn.execute("SELECT seq, length(data) FROM payloads ORDER BY seq").fetchall()
    return items, payloads


def assert_rejected(endpoint: Endpoint, response: requests.Response, status: int, mentions: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert mentions.lower() in error.lower(), error


ENQUEUE_CASES = [
    # (query, body, headers, status, what the error mentions)
    ("", b"x", {}, 400, "iterations"),
    ("iterations=", b"x", {}, 400, "integer"),
    ("iterations=abc", b"x", {}, 400, "integer"),
    ("iterations=1.5", b"x", {}, 400, "integer"),
    ("iterations=1e3", b"x", {}, 400, "integer"),
    ("iterations=0", b"x", {}, 400, "at least 1"),
    ("iterations=-3", b"x", {}, 400, "positive"),
    (f"iterations={MAX_ITERATIONS + 1}", b"x", {}, 400, f"at most {MAX_ITERATIONS}"),
    ("iterations=99999999999999999999999", b"x", {}, 400, f"too large: at most {MAX_ITERATIONS}"),
    ("iterations=%2B10", b"x", {}, 400, "without a '+' sign"),
    ("iterations=+10", b"x", {}, 400, "'+' stands for a space"),
    ("iterations=%C3%BCber", b"x", {}, 400, "got '\u00fcber'"),  # echoed as sent (UTF-8), not as latin-1
    ("iterations=1&%C3%BC=1&%C3%BC=2", b"x", {}, 400, "'\u00fc' is given more than once"),
    ("iterations=1&Iterations=2", b"x", {}, 400, "more than once"),
    ("iterations=1", b"", {}, 400, "empty"),
    ("iterations=1", b"data=", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "empty"),
    ("iterations=1&buffer=", b"", {}, 400, "empty"),
    ("iterations=1", b"x" * (MAX_PAYLOAD + 1), {"Content-Type": "application/octet-stream"}, 413, "limit"),
    ("iterations=1", b"data=" + b"y" * (MAX_PAYLOAD + 1), {"Content-Type": "application/x-www-form-urlencoded"},
     413, "limit"),
    ("iterations=1", b"--zz\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nv\r\n--zz--\r\n",
     {"Content-Type": "multipart/form-data; boundary=zz"}, 400, "'data'"),
    ("iterations=1", b"data=a&data=b", {"Content-Type": "application/x-www-form-urlencoded"}, 400,
     "'data' is given more than once"),
    ("iterations=1", b'--zz\r\nContent-Disposition: form-data; name="data"\r\n\r\na\r\n'
     b'--zz\r\nContent-Disposition: form-data; name="data"\r\n\r\nb\r\n--zz--\r\n',
     {"Content-Type": "multipart/form-data; boundary=zz"}, 400, "'data' is given more than once"),
    ("iterations=1", b"this is not multipart", {"Content-Type": "multipart/form-data; boundary=zz"}, 400, "multipart"),
    ("iterations=1", b"x", {"Content-Type": "multipart/form-data"}, 400, "boundary"),
]


@pytest.mark.parametrize(("query", "body", "headers", "status", "mentions"), ENQUEUE_CASES)
def test_bad_enqueue_is_refused_and_stores_nothing(endpoint: Endpoint, query: str, body: bytes,
                                                   headers: dict[str, str], status: int, mentions: str) -> None:
    endpoint.enqueue(b"already here", 5)
    before = snapshot(endpoint)
    response = requests.put(f"{endpoint.url}/enqueue?{query}", data=body, headers=headers, timeout=10)
    assert_rejected(endpoint, response, status, mentions)
    assert snapshot(endpoint) == before


def test_oversized_multipart_upload_is_refused(endpoint: Endpoint) -> None:
    before = snapshot(endpoint)
    response = requests.put(f"{endpoint.url}/enqueue?iterations=1",
                            files={"data": ("f", os.urandom(MAX_PAYLOAD + 1))}, timeout=10)
    assert_rejected(endpoint, response, 413, "limit")
    assert snapshot(endpoint) == before


def test_payload_at_the_limit_is_accepted(endpoint: Endpoint) -> None:
    work_id = endpoint.enqueue(b"z" * MAX_PAYLOAD, 1)
    assert endpoint.work(work_id).json()["payload_bytes"] == MAX_PAYLOAD


def test_oversized_body_is_refused_before_it_is_sent(endpoint: Endpoint) -> None:
    """Only headers are sent: the 413 must come back without the server waiting for the body."""
    before = snapshot(endpoint)
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        sock.sendall(b"PUT /enqueue?iterations=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n")
        chunks = []
        while chunk := sock.recv(4096):  # the server closes the connection after refusing
            chunks.append(chunk)
    answer = b"".join(chunks).decode()
    status_line, _, rest = answer.partition("\r\n")
    assert " 413 " in status_line, answer
    assert '"error"' in rest and "application/json" in rest
    assert snapshot(endpoint) == before


PULL_CASES = [
    ("", 400, "top"),
    ("top=", 400, "integer"),
    ("top=x", 400, "integer"),
    ("top=0", 400, "at least 1"),
    ("top=-1", 400, "positive"),
    (f"top={MAX_TOP + 1}", 400, f"at most {MAX_TOP}"),
    ("top=1&TOP=2", 400, "more than once"),
]


@pytest.mark.parametrize(("query", "status", "mentions"), PULL_CASES)
def test_bad_pull_is_refused_and_delivers_nothing(services: Services, endpoint: Endpoint, query: str, status: int,
                                                  mentions: str) -> None:
    work_id = endpoint.enqueue(b"payload", 1)
    complete_directly(endpoint, work_id)
    before = snapshot(endpoint)
    response = requests.post(f"{endpoint.url}/pullCompleted?{query}", timeout=10)
    assert_rejected(endpoint, response, status, mentions)
    assert snapshot(endpoint) == before
    assert [item["id"] for item in endpoint.pull(1)] == [work_id]


def complete_directly(endpoint: Endpoint, work_id: str) -> None:
    """Claim and complete through the worker API, as a worker would."""
    claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "t"}, headers=WORKER_AUTH, timeout=10)
    assert claim.headers["X-Work-Id"] == work_id
    done = requests.post(f"{endpoint.url}/internal/work/{work_id}/result", headers=WORKER_AUTH, timeout=10,
                         json={"worker": "t", "result": "ab" * 64})
    assert done.json() == {"stored": True}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nowhere", 404),
    ("GET", "/enqueue?iterations=1", 405),
    ("POST", "/enqueue?iterations=1", 405),
    ("GET", "/pullCompleted?top=1", 405),
    ("DELETE", "/stats", 405),
    ("GET", "/work/not-an-id", 404),
    ("GET", "/work/a-0000000000000000", 404),
])
def test_unknown_routes_and_methods(endpoint: Endpoint, method: str, path: str, status: int) -> None:
    before = snapshot(endpoint)
    response = requests.request(method, f"{endpoint.url}{path}", timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]
    assert snapshot(endpoint) == before


INTERNAL_ROUTES = [
    ("POST", "/internal/claim"),
    ("POST", "/internal/work/a-0123456789abcdef/renew"),
    ("POST", "/internal/work/a-0123456789abcdef/release"),
    ("POST", "/internal/work/a-0123456789abcdef/result"),
    ("POST", "/internal/peer/take-completed?top=1&delivery=" + "0" * 32),
    ("GET", "/internal/peer/work/a-0123456789abcdef"),
]


@pytest.mark.parametrize(("method", "path"), INTERNAL_ROUTES)
@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong-secret-wrong-secret"}, 403),
    ({"Authorization": "Basic dGVzdDp0ZXN0"}, 401),
], ids=["missing", "wrong", "other-scheme"])
def test_internal_routes_refuse_missing_or_wrong_secret(endpoint: Endpoint, method: str, path: str,
                                                        headers: dict[str, str], status: int) -> None:
    endpoint.enqueue(b"keep me pending", 3)
    before = snapshot(endpoint)
    response = requests.request(method, f"{endpoint.url}{path}", headers=headers, json={"worker": "w"}, timeout=10)
    assert_rejected(endpoint, response, status, "credentials")
    assert snapshot(endpoint) == before


WORKER_ROUTES = [route for route in INTERNAL_ROUTES if "/peer/" not in route[1]]
PEER_ROUTES = [route for route in INTERNAL_ROUTES if "/peer/" in route[1]]


def test_public_answers_give_counts_not_the_workers_names(services: Services) -> None:
    a, b = services.endpoint_pair()
    work_id = b.enqueue(b"x", 1)
    claim = requests.post(f"{b.url}/internal/claim", json={"worker": "i-0abc"}, headers=WORKER_AUTH, timeout=10)
    assert claim.headers["X-Work-Id"] == work_id
    wrong_keys = (WORKER_AUTH, {"Authorization": f"Bearer {SECRET}"})  # nothing but the peer key opens details
    for endpoint in (b, a):  # the owner's answer, and the other endpoint's through the peer
        public = endpoint.work(work_id, public=True).json()
        assert public["state"] == "running" and "worker_id" not in public
        assert endpoint.work(work_id).json()["worker_id"] == "i-0abc"
        for headers in wrong_keys:
            response = requests.get(f"{endpoint.url}/work/{work_id}", headers=headers, timeout=10)
            assert_rejected(endpoint, response, 403, "peer key")
    public_stats = b.stats(public=True)
    assert "workers" not in public_stats and public_stats["workers_heard_from"] == 1
    full = b.stats()
    assert [worker["id"] for worker in full["workers"]] == ["i-0abc"] and full["workers_heard_from"] == 1
    for headers in wrong_keys:
        response = requests.get(f"{b.url}/stats", headers=headers, timeout=10)
        assert_rejected(b, response, 403, "peer key")


@pytest.mark.parametrize(("method", "path", "headers"), [
    *[(method, path, PEER_AUTH) for method, path in WORKER_ROUTES],  # the peer key is not a worker's
    *[(method, path, WORKER_AUTH) for method, path in PEER_ROUTES],  # a worker cannot take the users' results
    *[(method, path, {"Authorization": f"Bearer {SECRET}"}) for method, path in INTERNAL_ROUTES],  # nor the secret
])
def test_each_key_opens_its_own_routes_only(endpoint: Endpoint, method: str, path: str,
                                            headers: dict[str, str]) -> None:
    endpoint.enqueue(b"keep me pending", 3)
    before = snapshot(endpoint)
    response = requests.request(method, f"{endpoint.url}{path}", headers=headers, json={"worker": "w"}, timeout=10)
    assert_rejected(endpoint, response, 403, "wrong credentials")
    assert snapshot(endpoint) == before


def test_the_right_keys_open_the_worker_and_peer_routes(endpoint: Endpoint) -> None:
    work_id = endpoint.enqueue(b"x", 1)
    claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "w"}, headers=WORKER_AUTH, timeout=10)
    assert claim.status_code == 200 and claim.headers["X-Work-Id"] == work_id
    result = hashlib.sha512(b"x").hexdigest()
    done = requests.post(f"{endpoint.url}/internal/work/{work_id}/result", headers=WORKER_AUTH, timeout=10,
                         json={"worker": "w", "result": result})
    assert done.status_code == 200, done.text
    peek = requests.get(f"{endpoint.url}/internal/peer/work/{work_id}", headers=PEER_AUTH, timeout=10)
    assert peek.status_code == 200 and peek.json()["result"] == result
    take = requests.post(f"{endpoint.url}/internal/peer/take-completed?top=5&delivery={'1' * 32}", headers=PEER_AUTH,
                         timeout=10)
    assert take.status_code == 200 and [item["id"] for item in take.json()] == [work_id]


@pytest.mark.parametrize(("path", "body", "status", "mentions"), [
    ("/internal/claim", b"not json", 400, "json"),
    ("/internal/claim", b"[]", 400, "object"),
    ("/internal/claim", b'{"worker": ""}', 400, "worker"),
    ("/internal/claim", b'{"worker": "has spaces"}', 400, "worker"),
    ("/internal/work/{id}/result", b'{"worker": "w", "result": "xyz"}', 400, "hex"),
    ("/internal/work/{id}/result", b'{"worker": "w", "result": "' + b"A" * 128 + b'"}', 400, "hex"),
    ("/internal/work/{id}/result", b'{"worker": "w", "result": "' + b"a" * 128 + b'", "duration_s": -1}', 400,
     "duration"),
    ("/internal/work/a-0123456789abcdef/result", b'{"worker": "w", "result": "' + b"a" * 128 + b'"}', 404, "no work"),
    ("/internal/work/{id}/renew", b'{"worker": "w", "attempt": "1"}', 400, "attempt"),
    ("/internal/work/{id}/renew", b'{"worker": "w", "attempt": 0}', 400, "attempt"),
    ("/internal/work/{id}/renew", b'{"worker": "w", "attempt": 1}', 409, "lease"),
    ("/internal/work/{id}/renew", b'{"worker": "w", "attempt": 18446744073709551616}', 400, "attempt"),
    ("/internal/work/{id}/result", b'{"worker": "w", "result": "' + b"a" * 128 + b'", "duration_s": Infinity}', 400,
     "json"),
    ("/internal/work/{id}/result", b'{"worker": "w", "result": "' + b"a" * 128 + b'", "duration_s": 1e400}', 400,
     "duration"),
])
def test_bad_worker_requests(endpoint: Endpoint, path: str, body: bytes, status: int, mentions: str) -> None:
    work_id = endpoint.enqueue(b"pending item", 3)
    before = snapshot(endpoint)
    response = requests.post(endpoint.url + path.format(id=work_id), data=body, headers=WORKER_AUTH, timeout=10)
    assert_rejected(endpoint, response, status, mentions)
    assert snapshot(endpoint) == before


def test_random_garbage_never_causes_a_server_error(endpoint: Endpoint) -> None:
    rng = random.Random(1234)
    paths = ["/enqueue", "/pullCompleted", "/stats", "/work/a-0123456789abcdef", "/internal/claim"]
    content_types = ["", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
                     "multipart/form-data; boundary=", "text/plain; charset=\xff", "application/json"]
    for _ in range(300):
        query = bytes(rng.randrange(33, 127) for _ in range(rng.randrange(0, 40))).decode()
        query = rng.choice(["", "iterations=2&", "top=3&", "buffer=%ff%00&iterations=1&"]) + query.replace("#", "")
        body = os.urandom(rng.randrange(0, 300))
        headers = {"Content-Type": rng.choice(content_types)}
        if rng.random() < 0.3:
            headers.update(WORKER_AUTH)
        response = requests.request(rng.choice(["GET", "PUT", "POST"]), f"{endpoint.url}{rng.choice(paths)}?{query}",
                                    data=body, headers=headers, timeout=10)
        assert response.status_code < 500, (query, headers, response.text)


def test_chunked_upload_is_read_and_limited(endpoint: Endpoint) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        for _ in range(total // 100):
            yield b"c" * 100

    accepted = requests.put(f"{endpoint.url}/enqueue?iterations=1", data=chunks(500),
                            headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert accepted.status_code == 200, accepted.text
    assert endpoint.work(accepted.json()["id"]).json()["payload_bytes"] == 500
    before = snapshot(endpoint)
    refused = requests.put(f"{endpoint.url}/enqueue?iterations=1", data=chunks(MAX_PAYLOAD + 100_000),
                           headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert_rejected(endpoint, refused, 413, "limit")
    assert snapshot(endpoint) == before
