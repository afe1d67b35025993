-- Lease table, agent metadata and the event outbox. Instants are integer epoch milliseconds (UTC).

CREATE TABLE leases (
    grant_id         TEXT PRIMARY KEY,
    subject          TEXT NOT NULL DEFAULT '',
    action           TEXT NOT NULL DEFAULT '',
    request_id       TEXT NOT NULL DEFAULT '',
    not_before_ms    INTEGER NOT NULL DEFAULT 0,
    not_after_ms     INTEGER NOT NULL DEFAULT 0,
    offline_mode     TEXT NOT NULL DEFAULT 'HOLD' CHECK (offline_mode IN ('HOLD', 'REVOKE_AFTER')),
    offline_grace_ms INTEGER NOT NULL DEFAULT 0,
    state            TEXT NOT NULL CHECK (state IN ('active', 'removed', 'tombstone', 'failed')),
    seq              INTEGER NOT NULL,
    applied_at_ms    INTEGER,
    removed_at_ms    INTEGER,
    remove_reason    TEXT NOT NULL DEFAULT ''
);

-- Serves the expiry loop (all active leases) and `jitmesh-agent check` (one subject and action).
CREATE INDEX leases_active ON leases (subject, action) WHERE state = 'active';

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE outbox (
    event_id       TEXT PRIMARY KEY,
    created        INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    grant_id       TEXT NOT NULL DEFAULT '',
    subject        TEXT NOT NULL DEFAULT '',
    action         TEXT NOT NULL DEFAULT '',
    observed_at_ms INTEGER NOT NULL,
    details        TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX outbox_created ON outbox (created);
