-- schema.sql as it was at version 2 (commit 572cfe9): tests/test_store.py makes files with it
-- that the store must migrate. Frozen: do not edit.

-- dynamic-workload: the data model of one endpoint's SQLite file.
--
-- This file is the one source of the data model. The endpoint applies it at every start
-- (every statement is idempotent), so a new file is created and an older one gains what
-- it lacks. user_version (last line) is bumped whenever a change needs more than that;
-- the endpoint refuses a file written by a newer schema than its own.
--
-- Times are unix seconds (REAL). Work item states, RQ-style, each explicit:
--   pending   -> running    a worker claimed it under a lease
--   running   -> completed  a worker submitted the result (the first result stored wins)
--   running   -> pending    the lease expired (worker died) or the worker released it
--   running   -> failed     the lease expired and max attempts were used up
--   pending/failed -> completed  a late result still counts: the work is deterministic

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS work_items (
    seq              INTEGER PRIMARY KEY,          -- local insertion order
    id               TEXT    NOT NULL UNIQUE,      -- public id "<node>-<16 hex>"; the prefix names the owner
    iterations       INTEGER NOT NULL CHECK (iterations >= 1),
    payload_bytes    INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'completed', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,   -- claims so far; also the lease's fencing token
    worker_id        TEXT,                         -- holder of the current (or last) lease
    created_at       REAL    NOT NULL,
    claimed_at       REAL,
    lease_expires_at REAL,
    completed_at     REAL,
    duration_s       REAL,                         -- compute time reported by the worker
    result           TEXT,                         -- 128 lowercase hex digits once completed
    delivered_at     REAL,                         -- when pullCompleted handed it out (once)
    delivery_id      TEXT,                         -- that pullCompleted call, so a retried take repeats itself
    failed_reason    TEXT
);

-- Payloads live apart from item rows so that scans of work_items never walk large blobs.
-- A payload is deleted when its item completes; a failed item keeps it for inspection.
CREATE TABLE IF NOT EXISTS payloads (
    seq  INTEGER PRIMARY KEY REFERENCES work_items (seq) ON DELETE CASCADE,
    data BLOB NOT NULL
);

-- "Oldest pending row" and the claim order: the first entry of this index.
CREATE INDEX IF NOT EXISTS work_items_pending
    ON work_items (created_at) WHERE state = 'pending';
-- Expired leases, found without scanning finished items.
CREATE INDEX IF NOT EXISTS work_items_leased
    ON work_items (lease_expires_at) WHERE state = 'running';
-- pullCompleted: newest undelivered results first.
CREATE INDEX IF NOT EXISTS work_items_undelivered
    ON work_items (completed_at) WHERE state = 'completed' AND delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS work_items_delivery
    ON work_items (delivery_id) WHERE delivery_id IS NOT NULL;
-- Retention: delivered results, oldest first, for pruning.
CREATE INDEX IF NOT EXISTS work_items_delivered
    ON work_items (delivered_at) WHERE delivered_at IS NOT NULL;
-- Recent job durations, for the scaler's sizing.
CREATE INDEX IF NOT EXISTS work_items_recently_completed
    ON work_items (completed_at) WHERE state = 'completed';
-- Recent arrivals, for the scaler's sizing of the stream.
CREATE INDEX IF NOT EXISTS work_items_created
    ON work_items (created_at);

-- Items per state, kept by triggers in the same transaction as the change, so the
-- backlog and /stats cost one row read however many items the file holds.
CREATE TABLE IF NOT EXISTS state_counts (
    state TEXT PRIMARY KEY,
    items INTEGER NOT NULL
);
INSERT OR IGNORE INTO state_counts (state, items)
    VALUES ('pending', 0), ('running', 0), ('completed', 0), ('failed', 0);

CREATE TRIGGER IF NOT EXISTS work_items_count_insert AFTER INSERT ON work_items
BEGIN
    UPDATE state_counts SET items = items + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS work_items_count_update AFTER UPDATE OF state ON work_items
    WHEN OLD.state <> NEW.state
BEGIN
    UPDATE state_counts SET items = items - 1 WHERE state = OLD.state;
    UPDATE state_counts SET items = items + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS work_items_count_delete AFTER DELETE ON work_items
BEGIN
    UPDATE state_counts SET items = items - 1 WHERE state = OLD.state;
END;

-- Workers that contacted this endpoint (claim, lease renewal, result, or an empty poll).
-- The scaler reads it to find instances that stopped contacting both endpoints.
CREATE TABLE IF NOT EXISTS workers (
    worker_id      TEXT PRIMARY KEY,
    first_seen_at  REAL NOT NULL,
    last_seen_at   REAL NOT NULL,
    jobs_completed INTEGER NOT NULL DEFAULT 0
);

-- The scaler (cron/scale.py) on this endpoint's host: its last run and its circuit breaker.
-- Written by the scaler, shown by GET /stats.
CREATE TABLE IF NOT EXISTS scaler (
    node_id              TEXT PRIMARY KEY,
    last_run_at          REAL,
    last_decision        TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,  -- launch/provisioning failures in a row
    breaker_open         INTEGER NOT NULL DEFAULT 0,  -- 1: launching stopped after too many failures
    last_failure_at      REAL,
    last_error           TEXT,
    breaker_reset_at     REAL                         -- set by `python -m cron.scale --reset-breaker`
);

PRAGMA user_version = 2;
