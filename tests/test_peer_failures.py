"""pullCompleted when the peer misbehaves: this endpoint's results are never lost, and a peer
take whose answer was lost is replayed by a later pull."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from conftest import WORKER_AUTH, Endpoint, Services, free_port, reply, wait_for


def complete(endpoint: Endpoint, payload: bytes) -> str:
    work_id = endpoint.enqueue(payload, 1)
    claim = requests.post(f"{endpoint.url}/internal/claim", json={"worker": "t"}, headers=WORKER_AUTH, timeout=10)
    assert claim.headers["X-Work-Id"] == work_id
    requests.post(f"{endpoint.url}/internal/work/{work_id}/result", json={"worker": "t", "result": "c" * 128},
                  headers=WORKER_AUTH, timeout=10).raise_for_status()
    return work_id


@contextmanager
def fake_peer(behaviour: str, target: str = "") -> Iterator[str]:
    """An HTTP server standing in for the peer: "404" answers everything with 404; "lose-first"
    forwards to `target` but drops the first answer on the floor after the peer acted on it."""
    state = {"dropped": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 -- the stdlib's naming
            if behaviour == "404":
                self.send_error(404)
                return
            request = urllib.request.Request(target + self.path, data=b"", method="POST",
                                             headers={"Authorization": self.headers["Authorization"]})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                self.send_error(exc.code)
                return
            if state["dropped"] == 0:
                state["dropped"] += 1
                self.close_connection = True  # the peer took the results; its answer never arrives
                return
            reply(self, 200, "application/json", body)

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_peer_answering_404_does_not_cost_this_endpoints_results(services: Services) -> None:
    with fake_peer("404") as peer_url:
        a = services.endpoint("a", peer_url=peer_url)
        work_id = complete(a, b"mine")
        response = requests.post(f"{a.url}/pullCompleted?top=5", timeout=10)
        assert response.status_code == 200, response.text
        assert [item["id"] for item in response.json()] == [work_id]


def test_a_peer_take_whose_answer_was_lost_is_replayed_by_a_later_pull(services: Services) -> None:
    b = services.endpoint("b")
    peer_work = complete(b, b"peer's")
    with fake_peer("lose-first", b.url) as proxy_url:
        a = services.endpoint("a", peer_url=proxy_url)
        assert a.pull(5) == []  # B marked its result delivered, but the answer was lost on the way
        assert b.pull(5) == []  # ... so B will not hand it out again by itself
        # After the peer's retry interval, the next pull at A replays the take and gets it.
        received = wait_for(lambda: a.pull(5), timeout=20, what="the replayed take")
        assert [item["id"] for item in received] == [peer_work]
        assert a.pull(5) == []
