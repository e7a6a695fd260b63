"""pullCompleted?delivery=<token>: a client that repeats its token gets the same answer again (its
first answer may have been lost), the peer's part included, and never a result twice."""

from __future__ import annotations

import socketserver
import sqlite3
import threading
import time
import uuid
import wsgiref.simple_server
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from test_peer_failures import complete, fake_peer
from writer_holds import Background, committing_too_long, settle

from conftest import SECRET, Endpoint, Services, serving, wait_for
from endpoint.app import Limits, make_app
from endpoint.peer import Peer
from endpoint.pulls import peer_token
from endpoint.secret import peer_key
from endpoint.store import Store, StoreUnavailable


def pull(url: str, top: int, token: str | None = None) -> requests.Response:
    params: dict[str, object] = {"top": top, **({"delivery": token} if token is not None else {})}
    return requests.post(f"{url}/pullCompleted", params=params, timeout=30)


def ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()]


def new_token() -> str:
    return str(uuid.uuid4())


def test_a_repeated_token_gets_the_first_answer_whatever_top(services: Services) -> None:
    endpoint = services.endpoint("a")
    first_done = [complete(endpoint, b"first %d" % index) for index in range(3)]
    token = new_token()
    first = pull(endpoint.url, 2, token)
    assert ids(first) == [first_done[2], first_done[1]] and "Delivery-Replayed" not in first.headers
    later_done = [complete(endpoint, b"later %d" % index) for index in range(2)]
    for top in (2, 1, 10):  # the same answer, not more, not fewer, not the newer results
        again = pull(endpoint.url, top, token)
        assert again.json() == first.json() and again.headers["Delivery-Replayed"] == "true"
    rest = ids(pull(endpoint.url, 10))
    assert sorted(rest) == sorted([first_done[0], *later_done])  # nothing of them went to the token
    assert ids(pull(endpoint.url, 10, token)) == ids(first)
    empty_token = new_token()  # an empty answer is an answer too
    assert ids(pull(endpoint.url, 10, empty_token)) == []
    newest = complete(endpoint, b"after the empty pull")
    assert ids(pull(endpoint.url, 10, empty_token)) == []  # ... its repeat stays empty
    assert ids(pull(endpoint.url, 10)) == [newest]


def test_the_repeat_holds_the_peers_part_also_when_the_peer_is_gone(services: Services) -> None:
    a, b = services.endpoint_pair()
    own = complete(a, b"a's")
    peers = [complete(b, b"b's %d" % index) for index in range(3)]
    token = new_token()
    first = pull(a.url, 3, token)
    assert sorted(ids(first)) == sorted([own, peers[1], peers[2]])  # filled up with b's newest
    b.service.kill()  # the repeat needs no peer: the peer's part is recorded at a
    again = pull(a.url, 50, token)
    assert again.json() == first.json() and again.headers["Delivery-Replayed"] == "true"
    b.restart()
    assert ids(pull(b.url, 10)) == [peers[0]]  # b handed the others out once, to that token
    assert ids(pull(a.url, 10)) == []


def test_the_same_token_at_the_other_endpoint_is_another_pull(services: Services) -> None:
    a, b = services.endpoint_pair()
    at_a, at_b = complete(a, b"a's"), complete(b, b"b's")
    token = new_token()
    assert ids(pull(a.url, 1, token)) == [at_a]
    assert ids(pull(b.url, 1, token)) == [at_b]  # tokens belong to the endpoint that got them
    assert ids(pull(a.url, 1, token)) == [at_a]


def test_a_lost_answer_of_the_peer_is_not_in_the_answer_and_goes_out_again(services: Services) -> None:
    b = services.endpoint("b")
    peers = complete(b, b"b's")
    with fake_peer("lose-first", b.url) as proxy_url:
        a = services.endpoint("a", peer_url=proxy_url)
        own = complete(a, b"a's")
        token = new_token()
        first = pull(a.url, 5, token)  # b took its result under the derived token; its answer was lost
        assert ids(first) == [own]
        assert ids(pull(b.url, 5)) == []  # b holds it as delivered, for the moment
        assert pull(a.url, 5, token).json() == first.json()  # the repeat: the answer given, not more
        # a gives it back before it takes anything else from b; then it goes out once.
        received = wait_for(lambda: ids(pull(a.url, 5)), timeout=20, what="the given-back result")
        assert received == [peers]
    assert pull(a.url, 5, token).json() == first.json()
    assert ids(pull(b.url, 5)) == []


def test_concurrent_pulls_with_one_token_take_once_and_all_get_the_same_answer(services: Services) -> None:
    a, b = services.endpoint_pair()
    made = [complete(a, b"a %d" % index) for index in range(8)] + [complete(b, b"b %d" % index) for index in range(8)]
    token = new_token()
    barrier = threading.Barrier(8)
    answers: list[requests.Response] = []

    def puller() -> None:
        barrier.wait()
        answers.append(pull(a.url, 10, token))

    threads = [threading.Thread(target=puller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * 8, [answer.text for answer in answers]
    assert len({answer.text for answer in answers}) == 1  # one take; the others are its repeats
    taken = ids(answers[0])
    assert len(taken) == 10  # a's 8 and 2 of b's
    assert sum(answer.headers.get("Delivery-Replayed") == "true" for answer in answers) == 7
    rest = ids(pull(a.url, 100)) + ids(pull(b.url, 100))
    assert Counter(taken + rest) == Counter(made)


def test_concurrent_pulls_with_their_own_tokens_at_both_endpoints_hand_each_result_out_once(
        services: Services) -> None:
    a, b = services.endpoint_pair()
    made = [complete((a, b)[index % 2], b"%d" % index) for index in range(40)]
    received: list[str] = []
    lock = threading.Lock()

    def puller(endpoint: Endpoint, top: int) -> None:
        for _ in range(12):
            token = new_token()
            answer = pull(endpoint.url, top, token)
            repeat = pull(endpoint.url, top + 5, token)  # as after a lost answer
            assert repeat.json() == answer.json()
            with lock:
                received.extend(ids(answer))

    threads = [threading.Thread(target=puller, args=(endpoint, top)) for endpoint in (a, b) for top in (1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received += ids(pull(a.url, 100)) + ids(pull(b.url, 100))
    assert Counter(received) == Counter(made)


@pytest.mark.parametrize("token", ["", "short", "x" * 129, "has space in it!", "slash/in/the/token", "\u00e9" * 16])
def test_a_malformed_token_is_400_and_takes_nothing(services: Services, token: str) -> None:
    endpoint = services.endpoint("a")
    done = complete(endpoint, b"kept")
    response = pull(endpoint.url, 5, token)
    assert response.status_code == 400, response.text
    assert "delivery" in response.json()["error"]
    twice = requests.post(f"{endpoint.url}/pullCompleted?top=5&delivery={'t' * 20}&delivery={'u' * 20}", timeout=10)
    assert twice.status_code == 400
    assert ids(pull(endpoint.url, 5)) == [done]


# -- in this process: expiry, the writer's overruns, an unrecorded peer part -----------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def served(store: Store, peer: Peer | None = None) -> Iterator[str]:
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, make_app(store, SECRET, Limits(), peer),
                                               server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    with serving(server) as url:
        yield url


def completed_in(store: Store, payload: bytes) -> str:
    work_id = store.enqueue(payload, 1).work_id
    assert store.claim("w") is not None
    store.complete(work_id, "w", "c" * 128, 0.1)
    return work_id


@contextmanager
def app_store(path: Path, **options: float) -> Iterator[tuple[str, Store]]:
    store = Store(path, "a", maintenance_interval=3600, **options)  # type: ignore[arg-type]
    try:
        with served(store) as url:
            yield url, store
    finally:
        store.close()


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    with app_store(tmp_path / "a.sqlite3", delivery_token_ttl_s=1.0) as served_store:
        yield served_store


@pytest.fixture
def slow_writes(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    with app_store(tmp_path / "a.sqlite3", write_wait_s=1.5) as served_store:
        yield served_store


def test_a_token_expires_and_is_then_refused_with_410(short_lived: tuple[str, Store]) -> None:
    url, store = short_lived
    done = completed_in(store, b"one")
    token = new_token()
    assert ids(pull(url, 5, token)) == [done]
    assert ids(pull(url, 5, token)) == [done]
    time.sleep(1.2)
    expired = pull(url, 5, token)
    assert expired.status_code == 410, expired.text
    assert "new token" in expired.json()["error"]
    assert store.prune_client_deliveries() == 1
    after_pruning = pull(url, 5, token)  # its results still carry it: still refused, nothing taken
    assert after_pruning.status_code == 410
    newer = completed_in(store, b"two")
    assert ids(pull(url, 5)) == [newer]


def test_a_pull_whose_take_overran_is_undone_unless_its_token_was_repeated(slow_writes: tuple[str, Store]) -> None:
    url, store = slow_writes
    done = completed_in(store, b"slow disk")
    token = new_token()
    heard, hold = committing_too_long(store, lambda: pull(url, 5, token))
    assert (heard.status_code, heard.json()["outcome"]) == (504, "unknown")
    hold.release()
    settle(store)  # nobody repeated the token: the take and the token are undone
    assert store.get(done)["delivered_at"] is None
    assert ids(pull(url, 5, token)) == [done]  # so the repeat is a first pull, and gets it

    other = completed_in(store, b"slower disk")
    token = new_token()
    heard, hold = committing_too_long(store, lambda: pull(url, 5, token))
    assert heard.status_code == 504
    repeat = Background(lambda: pull(url, 5, token))  # queued before the take has committed
    time.sleep(0.3)
    hold.release()
    assert ids(repeat.outcome()) == [other]
    settle(store)
    assert store.get(other)["delivered_at"] is not None  # kept: the repeat handed it out
    assert ids(pull(url, 5)) == [] and ids(pull(url, 5, token)) == [other]


def test_a_repeat_whose_peer_part_was_not_recorded_gets_it_from_the_peer_once(
        services: Services, tmp_path: Path) -> None:
    b = services.endpoint("b")
    peers = complete(b, b"b's")
    store = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    settle_peer_part = store.settle_peer_part
    failures = iter([StoreUnavailable("the disk hiccuped")])

    def failing_once(token: str, items: list) -> list:
        for failure in failures:
            raise failure
        return settle_peer_part(token, items)

    store.settle_peer_part = failing_once  # type: ignore[method-assign]
    try:
        with served(store, Peer(b.url, peer_key(SECRET))) as url:
            own = completed_in(store, b"a's")
            token = new_token()
            first = pull(url, 5, token)
            assert first.status_code == 503, first.text  # b's part was taken, but not recorded here
            assert ids(pull(b.url, 5)) == []
            again = pull(url, 5, token)  # asks b again under the same derived token: b replays
            assert sorted(ids(again)) == sorted([own, peers])
            assert pull(url, 5, token).json() == again.json()
            assert ids(pull(url, 5)) == [] and ids(pull(b.url, 5)) == []
    finally:
        store.close()
    # b took it under the token derived from the client's (which is how it could replay it).
    with sqlite3.connect(b.db) as conn:
        assert conn.execute("SELECT delivery_id FROM work_items WHERE id = ?", (peers,)).fetchone() == (
            peer_token("a", token),)
