"""The client keys of the public API, as one endpoint's SQLite file keeps them (the `client_keys`
table of schema.sql), through the store's single writer.

A client key is `dwk_<id>_<secret>`: the id (16 hex digits) names it in lists and in the items it
enqueued; the secret is 256 random bits. Only SHA-256 of the whole key is stored: the key is
random, so a fast hash without salt gives nothing away, and the lookup stays a single indexed
read per request. `python -m endpoint.client_keys` creates, lists and revokes keys.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from endpoint.writer import Writer

KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
KEY_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9 ._@:/+-]{1,100}")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str  # shown once, to whoever made it; never stored

    @property
    def key_hash(self) -> str:
        return key_hash(self.key)


def new_key() -> NewKey:
    key_id = secrets.token_hex(8)
    return NewKey(key_id, f"dwk_{key_id}_{secrets.token_urlsafe(32)}")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyConflict(Exception):
    """A key id that is there already with another hash (or name)."""


class KeyStore:
    def __init__(self, writer: Writer, reader: Callable[[], sqlite3.Connection]) -> None:
        self._writer = writer
        self._reader = reader

    def holder(self, presented: str) -> tuple[str | None, bool]:
        """(the key's id, whether it is live) for a presented key; (None, False) for a key never made."""
        row = self._reader().execute("SELECT id, revoked_at FROM client_keys WHERE key_hash = ?",
                                     (key_hash(presented),)).fetchone()
        if row is None:
            return None, False
        return row[0], row[1] is None

    def add(self, key_id: str, name: str, hashed: str) -> bool:
        """Record a key; True if it is new. The same id with the same hash and name again changes nothing
        (a repeated request); with another, KeyConflict."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT name, key_hash FROM client_keys WHERE id = ?", (key_id,)).fetchone()
            if row is not None:
                if tuple(row) != (name, hashed):
                    raise KeyConflict(key_id)
                return False
            conn.execute("INSERT INTO client_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
                         (key_id, name, hashed, time.time()))
            return True

        return self._writer.run(op)

    def revoke(self, key_id: str) -> bool | None:
        """True if revoked now, False if it was already, None if there is no such key."""

        def op(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute("SELECT revoked_at FROM client_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            if row[0] is not None:
                return False
            conn.execute("UPDATE client_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
            return True

        return self._writer.run(op)

    def listing(self) -> list[dict[str, Any]]:
        rows = self._reader().execute(
            "SELECT id, name, created_at, revoked_at FROM client_keys ORDER BY created_at").fetchall()
        return [{"id": key_id, "name": name, "created_at": created, "revoked_at": revoked}
                for key_id, name, created, revoked in rows]
