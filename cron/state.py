"""What the scaler remembers between runs: its last decision and its circuit breaker.

Kept in the endpoint's SQLite file (table `scaler` in schema.sql), so that GET /stats shows
it and a crash of the scaler loses nothing.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ScalerState:
    consecutive_failures: int = 0
    last_failure_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Breaker:
    threshold: int = 3  # consecutive launch/provisioning failures that open it
    cooldown_s: float = 600.0  # then one trial launch per cooldown ("half-open") until one succeeds

    def allowance(self, state: ScalerState, now: float) -> tuple[int | None, str]:
        """How many launches may go ahead: None (no limit), 0 (open) or 1 (a trial)."""
        if state.consecutive_failures < self.threshold:
            return None, "closed"
        since = now - (state.last_failure_at or 0.0)
        if since >= self.cooldown_s:
            return 1, f"half-open: one trial launch after {state.consecutive_failures} consecutive failures"
        # Not the last error itself: this status is part of the decision that public /stats shows.
        return 0, (f"open after {state.consecutive_failures} consecutive failures; "
                   f"next trial in {self.cooldown_s - since:.0f}s, or reset it with --reset-breaker")


class StateStore:
    def __init__(self, db_path: str | Path, node_id: str, breaker: Breaker | None = None) -> None:
        self.db_path = db_path
        self.node_id = node_id
        self.breaker = breaker or Breaker()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
        conn.execute("INSERT OR IGNORE INTO scaler (node_id) VALUES (?)", (self.node_id,))
        return conn

    def load(self) -> ScalerState:
        conn = self._connect()
        try:
            row = conn.execute("SELECT consecutive_failures, last_failure_at, last_error FROM scaler WHERE node_id = ?",
                               (self.node_id,)).fetchone()
        finally:
            conn.close()
        return ScalerState(*row)

    def record_run(self, decision: str, breaker_open: bool) -> None:
        self._update("last_run_at = ?, last_decision = ?, breaker_open = ?", time.time(), decision, int(breaker_open))

    def record_failure(self, error: str) -> None:
        # The failure that reaches the threshold opens the breaker now, not at the next run.
        self._update("consecutive_failures = consecutive_failures + 1, last_failure_at = ?, last_error = ?, "
                     "breaker_open = (consecutive_failures + 1 >= ?)", time.time(), error[:500], self.breaker.threshold)

    def record_success(self) -> None:
        self._update("consecutive_failures = 0, breaker_open = 0")

    def reset_breaker(self) -> None:
        self._update("consecutive_failures = 0, breaker_open = 0, breaker_reset_at = ?", time.time())

    def _update(self, assignments: str, *values: object) -> None:
        conn = self._connect()
        try:
            conn.execute(f"UPDATE scaler SET {assignments} WHERE node_id = ?", (*values, self.node_id))
        finally:
            conn.close()
