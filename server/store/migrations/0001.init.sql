-- jitmesh coordinator schema, version 1. Instants are integer epoch milliseconds (UTC).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    groups     TEXT NOT NULL,             -- JSON list
    disabled   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,          -- SHA-256 of the bearer token; the token is never stored
    user_name  TEXT NOT NULL REFERENCES users(name),
    label      TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);

CREATE TABLE agents (
    name            TEXT PRIMARY KEY,
    labels          TEXT NOT NULL,        -- JSON object
    credential_hash TEXT UNIQUE,
    enrolled_at     INTEGER NOT NULL,
    last_seen_at    INTEGER,
    version         TEXT NOT NULL DEFAULT '',
    boot_id         TEXT NOT NULL DEFAULT '',
    last_seq        INTEGER NOT NULL DEFAULT 0,
    last_acked_seq  INTEGER NOT NULL DEFAULT 0,
    removed_at      INTEGER
);

CREATE TABLE join_tokens (
    hash       TEXT PRIMARY KEY,
    labels     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    max_uses   INTEGER,                   -- NULL: reusable (development mode only)
    uses       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE requests (
    id                 TEXT PRIMARY KEY,
    subject            TEXT NOT NULL,
    agent              TEXT NOT NULL,
    action             TEXT NOT NULL,
    duration_ms        INTEGER NOT NULL,
    reason             TEXT NOT NULL,
    state              TEXT NOT NULL,
    rule               TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    approver_groups    TEXT NOT NULL,     -- JSON list
    created_at         INTEGER NOT NULL,
    pending_expires_at INTEGER,
    decided_at         INTEGER,
    decided_by         TEXT NOT NULL DEFAULT '',
    decision_reason    TEXT NOT NULL DEFAULT '',
    grant_id           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX requests_pending ON requests(pending_expires_at) WHERE state = 'PENDING';
CREATE INDEX requests_order ON requests(created_at, id);

CREATE TABLE reviews (
    request_id  TEXT NOT NULL REFERENCES requests(id),
    reviewer    TEXT NOT NULL,
    decision    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    reviewed_at INTEGER NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);

CREATE TABLE grants (
    id               TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL,
    agent            TEXT NOT NULL,
    subject          TEXT NOT NULL,
    action           TEXT NOT NULL,
    not_before       INTEGER NOT NULL,
    not_after        INTEGER NOT NULL,
    state            TEXT NOT NULL,
    offline_mode     TEXT NOT NULL,
    offline_grace_ms INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER,
    ended_by         TEXT NOT NULL DEFAULT '',
    end_reason       TEXT NOT NULL DEFAULT '',
    grant_seq        INTEGER NOT NULL DEFAULT 0,
    revoke_seq       INTEGER NOT NULL DEFAULT 0,
    applied_at       INTEGER,
    failure          TEXT NOT NULL DEFAULT '',
    epoch            INTEGER NOT NULL DEFAULT 0,
    CHECK (not_after > not_before)
);
CREATE INDEX grants_live ON grants(not_after)
    WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING');
CREATE INDEX grants_agent ON grants(agent, state);
CREATE INDEX grants_order ON grants(created_at, id);

-- The per-agent durable command log: gap-free seq per agent, written before the push.
CREATE TABLE commands (
    agent         TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    grant_id      TEXT NOT NULL,
    revoke_reason TEXT NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL,
    acked_at      INTEGER,
    ack_status    TEXT NOT NULL DEFAULT '',
    ack_reason    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (agent, seq)
) WITHOUT ROWID;

CREATE TABLE policies (
    version    INTEGER PRIMARY KEY,
    yaml       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    applied_by TEXT NOT NULL
);

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,      -- agent-chosen for agent events: stored once
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL DEFAULT '',
    agent      TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    grant_id   TEXT NOT NULL DEFAULT '',
    details    TEXT NOT NULL,             -- JSON object of strings
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_at ON audit(at);
CREATE INDEX audit_agent ON audit(agent, seq);
CREATE INDEX audit_subject ON audit(subject, seq);
CREATE INDEX audit_grant ON audit(grant_id);
