"""Client keys: each item belongs to the key that enqueued it, and a key takes only its own results
(the store, the pulls with and without delivery tokens), keys are kept as hashes only, and an older
file gains the column that records the key."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import PYTHON, REPO, SECRET, WORKER_AUTH, Services, free_port, reference, wait_for
from endpoint.key_store import KeyConflict, key_hash, new_key
from endpoint.pulls import Pulls
from endpoint.secret import operator_key
from endpoint.store import IdempotencyKeyReused, LeaseAnswer, Store

RESULT = "c" * 128
DATA = Path(__file__).resolve().parent / "data"
X, Y = "0123456789abcdef", "fedcba9876543210"  # two client keys' ids


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "a.sqlite3", "a", maintenance_interval=3600)
    try:
        yield opened
    finally:
        opened.close()


def completed(store: Store, payload: bytes, client: str | None) -> str:
    work_id = store.enqueue(payload, 1, client=client).work_id
    claim = store.claim("w")
    assert claim is not None and claim.work_id == work_id
    assert store.complete(work_id, "w", RESULT, 0.01) is LeaseAnswer.DONE
    return work_id


def test_a_key_takes_only_the_results_of_its_own_items(store: Store) -> None:
    x_items = [completed(store, b"x%d" % index, X) for index in range(3)]
    y_items = [completed(store, b"y%d" % index, Y) for index in range(2)]
    keyless = completed(store, b"none", None)
    assert {item.work_id for item in store.take_completed(10, "1" * 32, client=Y)} == set(y_items)
    assert store.take_completed(10, "2" * 32, client=Y) == []
    assert [item.work_id for item in store.take_completed(10, "3" * 32)] == [keyless]  # keys off: keyless items
    assert {item.work_id for item in store.take_completed(10, "4" * 32, client=X)} == set(x_items)
    assert store.get(x_items[0])["client_key"] == X
    assert store.stats()["undelivered"] == 0


def test_delivery_tokens_and_idempotency_keys_are_each_keys_own(store: Store) -> None:
    pulls = Pulls(store, peer=None)
    x_item, y_item = completed(store, b"x", X), completed(store, b"y", Y)
    token = "same-token-0123456789"
    first = pulls.pull(10, token, client=X)
    assert [item.work_id for item in first.items] == [x_item] and not first.replayed
    # The same token from key Y is Y's own pull: Y's result, never a replay of X's answer.
    other = pulls.pull(10, token, client=Y)
    assert [item.work_id for item in other.items] == [y_item] and not other.replayed
    again = pulls.pull(10, token, client=X)
    assert [item.work_id for item in again.items] == [x_item] and again.replayed
    # An Idempotency-Key names a request of one key: another key's same key makes its own item.
    made = store.enqueue(b"p", 2, "retry-1", client=X)
    elsewhere = store.enqueue(b"other payload", 2, "retry-1", client=Y)
    assert made.work_id != elsewhere.work_id and not elsewhere.replayed
    assert store.enqueue(b"p", 2, "retry-1", client=X).work_id == made.work_id
    with pytest.raises(IdempotencyKeyReused):
        store.enqueue(b"changed", 2, "retry-1", client=X)


def test_keys_are_stored_as_hashes_and_revoked_keys_stay_known(store: Store, tmp_path: Path) -> None:
    keys = store.client_keys
    made = new_key()
    assert made.key.startswith(f"dwk_{made.key_id}_") and len(made.key) > 50
    assert keys.add(made.key_id, "alice", made.key_hash) is True
    assert keys.add(made.key_id, "alice", made.key_hash) is False  # a repeated request: nothing new
    with pytest.raises(KeyConflict):
        keys.add(made.key_id, "mallory", key_hash("another key"))
    assert keys.holder(made.key) == (made.key_id, True)
    assert keys.holder(made.key + "x") == (None, False)
    assert keys.revoke(made.key_id) is True and keys.revoke(made.key_id) is False
    assert keys.revoke("0" * 16) is None
    assert keys.holder(made.key) == (made.key_id, False)
    (listed,) = keys.listing()
    assert listed["name"] == "alice" and listed["revoked_at"] is not None
    with sqlite3.connect(tmp_path / "a.sqlite3") as conn:  # the key itself is nowhere in the file
        dump = "\n".join(conn.iterdump())
    assert made.key not in dump and made.key_hash in dump


def test_a_version_3_file_gains_the_client_key_column_and_keeps_its_items(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript((DATA / "schema_v3.sql").read_text())
    conn.execute("INSERT INTO meta (key, value) VALUES ('node_id', 'a')")
    now = time.time()
    conn.execute("""INSERT INTO work_items (id, iterations, payload_bytes, state, created_at, completed_at, result)
                    VALUES ('a-0000000000000001', 3, 1, 'completed', ?, ?, ?)""", (now - 5, now, RESULT))
    conn.close()
    store = Store(path, "a", maintenance_interval=3600)
    try:
        assert store.get("a-0000000000000001")["client_key"] is None
        assert [item.work_id for item in store.take_completed(10, "5" * 32)] == ["a-0000000000000001"]
        assert completed(store, b"new", X)
        with sqlite3.connect(path) as check:
            assert check.execute("PRAGMA user_version").fetchone() == (4,)
    finally:
        store.close()
    Store(path, "a", maintenance_interval=3600).close()  # the next start changes nothing


# -- real endpoints, the command, and the clients' routes ----------------------------------------------------

def keys_command(tmp_path: Path, endpoints: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    flags = [flag for url in endpoints for flag in ("--endpoint", url)]
    return subprocess.run([PYTHON, "-m", "endpoint.client_keys", *flags, "--secret-file", str(secret_file), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "NO_PROXY": "*"})


def made_key(tmp_path: Path, endpoints: list[str], name: str) -> str:
    created = keys_command(tmp_path, endpoints, "create", name)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_with_keys_off_the_prior_art_commands_work_unchanged(services: Services) -> None:
    a, b = services.endpoint_pair()
    enqueued = subprocess.run(["curl", "-sS", "-X", "PUT", f"{a.url}/enqueue?iterations=10", "-d", "data=Hello"],
                              capture_output=True, text=True, timeout=30)
    work_id = json.loads(enqueued.stdout)["id"]
    services.worker([a, b])
    wait_for(lambda: a.work(work_id).json()["state"] == "completed", 30, "the job")
    pulled = subprocess.run(["curl", "-sS", "-X", "POST", f"{b.url}/pullCompleted?top=5"], capture_output=True,
                            text=True, timeout=30)
    assert json.loads(pulled.stdout) == [{"id": work_id, "result": reference(b"Hello", 10)}]
    assert "client_key" not in requests.get(f"{a.url}/work/{work_id}", timeout=10).json()


def test_with_keys_on_each_key_enqueues_and_pulls_its_own_and_nothing_else(services: Services,
                                                                          tmp_path: Path) -> None:
    a, b = services.endpoint_pair(extra_args=("--client-keys", "on"))
    urls = [a.url, b.url]
    alice, bob = made_key(tmp_path, urls, "alice"), made_key(tmp_path, urls, "bob")
    # Without a key 401, with a wrong one 403, JSON either way; nothing is stored.
    for url, method in ((f"{a.url}/enqueue?iterations=1", "PUT"), (f"{a.url}/pullCompleted?top=1", "POST"),
                        (f"{a.url}/work/a-0000000000000001", "GET")):
        for headers, status in (({}, 401), (bearer("dwk_nope"), 403), (WORKER_AUTH, 403)):
            answer = requests.request(method, url, data=b"x", headers=headers, timeout=10)
            assert answer.status_code == status and "error" in answer.json(), (url, headers, answer.text)
    assert a.stats(public=True)["pending"] == 0
    mine = {}
    for index in range(6):
        endpoint, key = (a, b)[index % 2], (alice, bob)[index // 3]
        answer = requests.put(f"{endpoint.url}/enqueue?iterations=50", data=b"job %d" % index, headers=bearer(key),
                              timeout=10)
        assert answer.status_code == 200, answer.text
        mine[answer.json()["id"]] = (key, reference(b"job %d" % index, 50))
    services.worker([a, b])
    wait_for(lambda: a.stats(public=True)["completed"] + b.stats(public=True)["completed"] == 6, 30, "the jobs")
    # bob pulls at a: only his, from both endpoints (b's through the peer), and none of alice's.
    bobs = requests.post(f"{a.url}/pullCompleted?top=10", headers=bearer(bob), timeout=10).json()
    assert {item["id"]: item["result"] for item in bobs} == \
        {work_id: result for work_id, (key, result) in mine.items() if key == bob}
    alices_id = next(work_id for work_id, (key, _) in mine.items() if key == alice and work_id.startswith("b-"))
    assert requests.get(f"{a.url}/work/{alices_id}", headers=bearer(bob), timeout=10).status_code == 404
    seen = requests.get(f"{a.url}/work/{alices_id}", headers=bearer(alice), timeout=10).json()
    assert seen["state"] == "completed" and "client_key" not in seen and "worker_id" not in seen
    assert "worker_id" in a.work(alices_id).json()  # the peer key still sees the details
    alices = requests.post(f"{b.url}/pullCompleted?top=10&delivery=alice-token-0123456789",
                           headers=bearer(alice), timeout=10).json()
    assert {item["id"] for item in alices} == {work_id for work_id, (key, _) in mine.items() if key == alice}
    # The same delivery token is bob's own pull: nothing of alice's.
    assert requests.post(f"{b.url}/pullCompleted?top=10&delivery=alice-token-0123456789", headers=bearer(bob),
                         timeout=10).json() == []
    # Revoked: refused at both endpoints at once.
    bob_id = bob.split("_")[1]
    revoked = keys_command(tmp_path, urls, "revoke", bob_id)
    assert revoked.returncode == 0, revoked.stderr
    for endpoint in (a, b):
        answer = requests.put(f"{endpoint.url}/enqueue?iterations=1", data=b"x", headers=bearer(bob), timeout=10)
        assert answer.status_code == 403 and "revoked" in answer.json()["error"]
    listed = keys_command(tmp_path, urls, "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and f"{bob_id}  revoked" in listed.stdout
    assert bob not in listed.stdout and alice not in listed.stdout  # the keys themselves are shown once only


def test_a_key_is_made_at_both_endpoints_or_at_neither(services: Services, tmp_path: Path) -> None:
    a = services.endpoint("a", extra_args=("--client-keys", "on"))
    down = f"http://127.0.0.1:{free_port()}"
    created = keys_command(tmp_path, [a.url, down], "create", "carol")
    assert created.returncode == 1 and created.stdout == "" and "not created" in created.stderr
    (listed,) = requests.get(f"{a.url}/internal/client-keys", auth=("op", operator_key(SECRET)), timeout=10).json()[
        "keys"]
    assert listed["name"] == "carol" and listed["revoked_at"] is not None
    bad = keys_command(tmp_path, [a.url], "create", "no\nnewlines")
    assert bad.returncode == 2
