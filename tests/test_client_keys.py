"""Client keys: each item belongs to the key that enqueued it, and a key takes only its own results
(the store, the pulls with and without delivery tokens), keys are kept as hashes only, and an older
file gains the column that records the key."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from endpoint.key_store import KeyConflict, key_hash, new_key
from endpoint.pulls import Pulls
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
