-- dynamic-workload: the data model of one endpoint's SQLite file.
--
-- This file is the one source of the data model. The endpoint applies it at every start, in
-- one transaction (every statement is idempotent), so a new file is created and an older one
-- gains what it lacks. user_version (last line) is bumped whenever a change needs more than
-- that; the endpoint refuses a file written by a newer schema than its own. A file older than
-- version 3 has its work_items table rebuilt from the definition below first (SQLite cannot add
-- CHECK constraints to an existing table), in the same transaction (endpoint/store.py); a later
-- one gains the plain columns added since (version 4: client_key) by ALTER TABLE ... ADD COLUMN.
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
    payload_bytes    INTEGER NOT NULL CHECK (payload_bytes >= 0),
    state            TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'completed', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0    -- claims that counted; also the lease's fencing token
                     CHECK (attempts >= 0),
    worker_id        TEXT,                         -- holder of the current (or last) lease
    created_at       REAL    NOT NULL,
    claimed_at       REAL,
    lease_expires_at REAL,
    -- 0: a lease carried over a restart of the endpoint that its worker has not renewed since;
    -- if it expires so, the worker was not heard from after the downtime and it does not count.
    lease_confirmed  INTEGER NOT NULL DEFAULT 1 CHECK (lease_confirmed IN (0, 1)),
    claim_token      TEXT,                         -- the worker's name for its claim: a repeated claim gets this lease back
    completed_at     REAL,
    duration_s       REAL,                         -- compute time reported by the worker
    result           TEXT,                         -- 128 lowercase hex digits once completed
    delivered_at     REAL,                         -- when pullCompleted handed it out (once)
    delivery_id      TEXT,                         -- that pullCompleted call, so a retried take repeats itself
    failed_reason    TEXT,
    client_key       TEXT,                         -- id of the client key that enqueued it (client keys on); else NULL
    -- The states' invariants, so that no bug can store what the states do not allow.
    CHECK ((state = 'completed') = (result IS NOT NULL)),
    CHECK (result IS NULL OR (length(result) = 128 AND result NOT GLOB '*[^0-9a-f]*')),
    CHECK (state <> 'completed' OR completed_at IS NOT NULL),
    CHECK (delivered_at IS NULL OR state = 'completed'),
    CHECK ((delivered_at IS NULL) = (delivery_id IS NULL)),
    CHECK ((state = 'running') = (lease_expires_at IS NOT NULL)),
    CHECK (state <> 'running' OR (worker_id IS NOT NULL AND claimed_at IS NOT NULL AND attempts >= 1)),
    CHECK (state <> 'failed' OR failed_reason IS NOT NULL)
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
-- pullCompleted: newest undelivered results first. Its queries name it (INDEXED BY): the planner
-- would otherwise walk work_items_recently_completed, i.e. the whole delivered history.
CREATE INDEX IF NOT EXISTS work_items_undelivered
    ON work_items (completed_at) WHERE state = 'completed' AND delivered_at IS NULL;
-- The same per client key (NULL with client keys off): a key takes only the results of its own items.
CREATE INDEX IF NOT EXISTS work_items_undelivered_by_client
    ON work_items (client_key, completed_at) WHERE state = 'completed' AND delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS work_items_delivery
    ON work_items (delivery_id) WHERE delivery_id IS NOT NULL;
-- Retention: delivered results, oldest first, for pruning.
CREATE INDEX IF NOT EXISTS work_items_delivered
    ON work_items (delivered_at) WHERE delivered_at IS NOT NULL;
-- Recent job durations, for the scaler's sizing (a range of completed_at, never all of it).
CREATE INDEX IF NOT EXISTS work_items_recently_completed
    ON work_items (completed_at) WHERE state = 'completed';
-- Recent arrivals, for the scaler's sizing of the stream.
CREATE INDEX IF NOT EXISTS work_items_created
    ON work_items (created_at);
-- Failed items, newest first, for the dashboard (however many items the file holds).
CREATE INDEX IF NOT EXISTS work_items_failed
    ON work_items (created_at) WHERE state = 'failed';

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

-- Idempotency-Key of PUT /enqueue: a retried request with the same key gets the first one's id
-- and makes no second item. Kept for a day after first use (endpoint/store.py: IDEMPOTENCY_TTL_S);
-- independent of the item, whose row retention may delete first.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    work_id     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,   -- sha256 of iterations and payload: the same key must mean the same request
    created_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_created
    ON idempotency_keys (created_at);

-- pullCompleted with a client's delivery token (?delivery=<token>): a repeat of the token gets the
-- same answer. This endpoint's part of it is the rows whose delivery_id is 'client:<token>'; the
-- peer's part, taken from the peer under a token derived from this one (endpoint/pulls.py), is
-- kept here once it is known, so that a repeat needs no peer. Kept for a day after first use
-- (endpoint/store.py: DELIVERY_TOKEN_TTL_S); the results stay delivered after that.
CREATE TABLE IF NOT EXISTS client_deliveries (
    token      TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    peer_limit INTEGER NOT NULL CHECK (peer_limit >= 0),  -- results asked of the peer; 0: none
    peer_part  TEXT,     -- JSON [[id, result, completed_at], ...]; NULL while the peer's answer is not settled
    CHECK (peer_limit > 0 OR peer_part IS NOT NULL)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_deliveries_created
    ON client_deliveries (created_at);

-- Client keys of the public API (endpoint/client_keys.py), when the endpoint has them on. Only a
-- hash of each key is kept: SHA-256 of the whole key, which is 256 random bits, so no salt or
-- slow hash is needed. A revoked key is kept (revoked_at), so that its items still name it.
CREATE TABLE IF NOT EXISTS client_keys (
    id         TEXT PRIMARY KEY CHECK (length(id) = 16 AND id NOT GLOB '*[^0-9a-f]*'),
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE CHECK (length(key_hash) = 64 AND key_hash NOT GLOB '*[^0-9a-f]*'),
    created_at REAL NOT NULL,
    revoked_at REAL
) WITHOUT ROWID;

-- Workers that contacted this endpoint (claim, lease renewal, result, or an empty poll).
-- The scaler reads it to find instances that stopped contacting both endpoints.
CREATE TABLE IF NOT EXISTS workers (
    worker_id      TEXT PRIMARY KEY,
    first_seen_at  REAL NOT NULL,
    last_seen_at   REAL NOT NULL,
    jobs_completed INTEGER NOT NULL DEFAULT 0
);
-- /stats lists the workers heard from lately; rows of workers not heard from for the history's
-- retention period are deleted (a fleet replaced daily leaves a thousand ids a day).
CREATE INDEX IF NOT EXISTS workers_last_seen
    ON workers (last_seen_at);

-- The scaler (cron/scale.py) on this endpoint's host: its last run and its circuit breaker.
-- The scaler posts each run to its endpoint (PUT /internal/scaler/runs/<run>, the scaler key), which
-- writes it here through its single writer; GET /stats shows it, and the scaler reads it back there.
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

-- The scaler's decision of every run, as it posted it (endpoint/scaler_record.py). Kept for the
-- retention period (--retention-days; 7 days when results are kept forever) and at most
-- SCALER_RUNS_KEPT rows (endpoint/store.py), newest first on the dashboard.
CREATE TABLE IF NOT EXISTS scaler_runs (
    run_id                TEXT PRIMARY KEY,             -- the scaler's name for the run
    recorded_at           REAL NOT NULL,                -- first posted (this endpoint's clock)
    updated_at            REAL NOT NULL,
    reason                TEXT NOT NULL,                -- the policy's reason, with the breaker's status
    needed                INTEGER NOT NULL CHECK (needed >= 0),     -- workers the policy sized for
    decided               INTEGER NOT NULL CHECK (decided >= 0),    -- launches the policy asked for
    allowed               INTEGER NOT NULL CHECK (allowed >= 0),    -- what the circuit breaker let through
    launched              INTEGER NOT NULL DEFAULT 0 CHECK (launched >= 0),   -- instances started
    provisioned           INTEGER NOT NULL DEFAULT 0 CHECK (provisioned >= 0),
    terminated            INTEGER NOT NULL DEFAULT 0 CHECK (terminated >= 0), -- by reconcile, this run
    ready                 INTEGER NOT NULL CHECK (ready >= 0),      -- the cluster's workers as this run saw them
    booting               INTEGER NOT NULL CHECK (booting >= 0),
    breaker               TEXT NOT NULL CHECK (breaker IN ('closed', 'half-open', 'open')),
    launch_failures       INTEGER NOT NULL DEFAULT 0 CHECK (launch_failures >= 0),
    provisioning_failures INTEGER NOT NULL DEFAULT 0 CHECK (provisioning_failures >= 0),
    errors                TEXT NOT NULL DEFAULT '[]',   -- JSON list of this run's failures (details: operator only)
    events_applied        INTEGER NOT NULL DEFAULT 0    -- the run's outcomes applied to the breaker so far
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS scaler_runs_recorded
    ON scaler_runs (recorded_at);

-- Counters that only grow, kept in the same transaction as what they count, so that they survive
-- restarts (GET /metrics: dw_*_total). Triggers keep the item counts; endpoint/store.py adds the
-- deliveries, give-backs and the scaler's figures. A file older than these counters starts them
-- from the items it holds.
CREATE TABLE IF NOT EXISTS event_counts (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL CHECK (value >= 0)
) WITHOUT ROWID;
INSERT OR IGNORE INTO event_counts (name, value)  -- the guard spares the count at every later start
    SELECT 'enqueued', count(*) FROM work_items WHERE NOT EXISTS (SELECT 1 FROM event_counts WHERE name = 'enqueued');
INSERT OR IGNORE INTO event_counts (name, value)
    SELECT 'completed', items FROM state_counts WHERE state = 'completed';
INSERT OR IGNORE INTO event_counts (name, value)
    SELECT 'failed', items FROM state_counts WHERE state = 'failed';
INSERT OR IGNORE INTO event_counts (name, value)
    SELECT 'delivered', count(*) FROM work_items INDEXED BY work_items_delivered
    WHERE delivered_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_counts WHERE name = 'delivered');
INSERT OR IGNORE INTO event_counts (name, value)
    VALUES ('given_back', 0), ('lease_expired', 0), ('scaler_runs', 0), ('scaler_launched', 0),
           ('scaler_provisioned', 0), ('scaler_terminated', 0), ('scaler_launch_failures', 0),
           ('scaler_provisioning_failures', 0);

CREATE TRIGGER IF NOT EXISTS work_items_enqueued AFTER INSERT ON work_items
BEGIN
    UPDATE event_counts SET value = value + 1 WHERE name = 'enqueued';
END;
CREATE TRIGGER IF NOT EXISTS work_items_failed AFTER UPDATE OF state ON work_items
    WHEN NEW.state = 'failed' AND OLD.state <> 'failed'
BEGIN
    UPDATE event_counts SET value = value + 1 WHERE name = 'failed';
END;
-- Only the requeue of expired leases sets lease_confirmed on an item that leaves 'running' (a
-- release sets neither; a claim and a renewal keep it running).
CREATE TRIGGER IF NOT EXISTS work_items_lease_expired AFTER UPDATE OF lease_confirmed ON work_items
    WHEN OLD.state = 'running' AND NEW.state IN ('pending', 'failed')
BEGIN
    UPDATE event_counts SET value = value + 1 WHERE name = 'lease_expired';
END;

-- Job run time (the worker's duration_s) and time from enqueue to completion, as histograms:
-- the items per bucket (le: the bucket's upper bound in seconds, 1e999 for +Inf) and the sum of
-- their values, added at each completion (GET /metrics cumulates them; the dashboard takes
-- percentiles from the difference of two samples).
CREATE TABLE IF NOT EXISTS duration_buckets (
    histogram TEXT NOT NULL CHECK (histogram IN ('job_run', 'time_to_result')),
    le        REAL NOT NULL,
    items     INTEGER NOT NULL DEFAULT 0,
    total_s   REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (histogram, le)
) WITHOUT ROWID;
INSERT OR IGNORE INTO duration_buckets (histogram, le)
    SELECT histogram.name, bound.le
    FROM (SELECT 'job_run' AS name UNION ALL SELECT 'time_to_result') AS histogram,
         (SELECT 0.005 AS le UNION ALL SELECT 0.01 UNION ALL SELECT 0.025 UNION ALL SELECT 0.05
          UNION ALL SELECT 0.1 UNION ALL SELECT 0.25 UNION ALL SELECT 0.5 UNION ALL SELECT 1
          UNION ALL SELECT 2.5 UNION ALL SELECT 5 UNION ALL SELECT 10 UNION ALL SELECT 30
          UNION ALL SELECT 60 UNION ALL SELECT 120 UNION ALL SELECT 300 UNION ALL SELECT 600
          UNION ALL SELECT 1800 UNION ALL SELECT 3600 UNION ALL SELECT 1e999) AS bound;

CREATE TRIGGER IF NOT EXISTS work_items_completed AFTER UPDATE OF state ON work_items
    WHEN NEW.state = 'completed' AND OLD.state <> 'completed'
BEGIN
    UPDATE event_counts SET value = value + 1 WHERE name = 'completed';
    UPDATE duration_buckets SET items = items + 1, total_s = total_s + NEW.duration_s
        WHERE histogram = 'job_run' AND NEW.duration_s IS NOT NULL
          AND le = (SELECT min(le) FROM duration_buckets WHERE histogram = 'job_run' AND le >= NEW.duration_s);
    UPDATE duration_buckets SET items = items + 1, total_s = total_s + max(0, NEW.completed_at - NEW.created_at)
        WHERE histogram = 'time_to_result'
          AND le = (SELECT min(le) FROM duration_buckets
                    WHERE histogram = 'time_to_result' AND le >= NEW.completed_at - NEW.created_at);
END;

-- Per-minute samples for the dashboard's charts, written by the endpoint's maintenance thread
-- through the single writer, kept for the retention period (--retention-days; 7 days when
-- results are kept forever). Totals are event_counts at that minute (per-minute rates are
-- differences); durations holds duration_buckets' items then, as JSON
-- {"job_run": [items per bucket], "time_to_result": [...]}, bucket order as in that table.
CREATE TABLE IF NOT EXISTS samples (
    at                   INTEGER PRIMARY KEY,   -- unix seconds, a whole minute
    enqueued_total       INTEGER NOT NULL,
    completed_total      INTEGER NOT NULL,
    failed_total         INTEGER NOT NULL,
    delivered_total      INTEGER NOT NULL,
    pending              INTEGER NOT NULL,
    running              INTEGER NOT NULL,
    oldest_pending_age_s REAL NOT NULL,
    workers_heard_from   INTEGER NOT NULL,
    durations            TEXT NOT NULL
);

-- The cluster's worker machines as the scalers list them at every run (PUT /internal/scaler/fleet), for
-- the worker-seconds and estimated cost in GET /stats (endpoint/usage.py). Kept two days after
-- the last listing.
CREATE TABLE IF NOT EXISTS fleet_machines (
    machine_id     TEXT PRIMARY KEY,                -- an instance id (the worker's id), or a host
    instance_type  TEXT NOT NULL,                   -- EC2's; the provider's name (local, ssh) off EC2
    market         TEXT NOT NULL CHECK (market IN ('on-demand', 'spot', 'none')),
    launched_at    REAL NOT NULL,                   -- EC2's launch time (the first listing off EC2)
    last_listed_at REAL NOT NULL CHECK (last_listed_at >= launched_at)
) WITHOUT ROWID;

PRAGMA user_version = 4;
