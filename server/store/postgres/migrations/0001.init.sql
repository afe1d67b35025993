-- jitmesh coordinator schema for PostgreSQL, version 1: the same tables and columns as the
-- SQLite schema (server/store/migrations/ 0001 to 0003; tests/store/test_schema.py keeps them
-- equal), with PostgreSQL's types. Instants are epoch milliseconds (BIGINT, UTC).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    groups     TEXT NOT NULL,             -- JSON list
    disabled   INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,
    user_name  TEXT NOT NULL REFERENCES users(name),
    label      TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX tokens_prefix ON tokens (substr(hash, 1, 16));

CREATE TABLE agents (
    name            TEXT PRIMARY KEY,
    labels          TEXT NOT NULL,        -- JSON object
    credential_hash TEXT UNIQUE,
    enrolled_at     BIGINT NOT NULL,
    last_seen_at    BIGINT,
    version         TEXT NOT NULL DEFAULT '',
    boot_id         TEXT NOT NULL DEFAULT '',
    last_seq        BIGINT NOT NULL DEFAULT 0,
    last_acked_seq  BIGINT NOT NULL DEFAULT 0,
    removed_at      BIGINT
);

CREATE TABLE join_tokens (
    hash       TEXT PRIMARY KEY,
    labels     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    max_uses   INTEGER,
    uses       INTEGER NOT NULL DEFAULT 0,
    replaces   TEXT
);

CREATE TABLE requests (
    id                 TEXT PRIMARY KEY,
    subject            TEXT NOT NULL,
    agent              TEXT NOT NULL,
    action             TEXT NOT NULL,
    duration_ms        BIGINT NOT NULL,
    reason             TEXT NOT NULL,
    state              TEXT NOT NULL,
    rule               TEXT NOT NULL,
    approvals_required INTEGER NOT NULL,
    approver_groups    TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    pending_expires_at BIGINT,
    decided_at         BIGINT,
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
    reviewed_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);

CREATE TABLE grants (
    id               TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL,
    agent            TEXT NOT NULL,
    subject          TEXT NOT NULL,
    action           TEXT NOT NULL,
    not_before       BIGINT NOT NULL,
    not_after        BIGINT NOT NULL,
    state            TEXT NOT NULL,
    offline_mode     TEXT NOT NULL,
    offline_grace_ms BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    ended_at         BIGINT,
    ended_by         TEXT NOT NULL DEFAULT '',
    end_reason       TEXT NOT NULL DEFAULT '',
    grant_seq        BIGINT NOT NULL DEFAULT 0,
    revoke_seq       BIGINT NOT NULL DEFAULT 0,
    applied_at       BIGINT,
    failure          TEXT NOT NULL DEFAULT '',
    epoch            BIGINT NOT NULL DEFAULT 0,
    CHECK (not_after > not_before)
);
CREATE INDEX grants_live ON grants(not_after)
    WHERE state IN ('PENDING_DELIVERY', 'ACTIVE', 'REVOKING');
CREATE INDEX grants_agent ON grants(agent, state);
CREATE INDEX grants_order ON grants(created_at, id);

CREATE TABLE commands (
    agent         TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    grant_id      TEXT NOT NULL,
    revoke_reason TEXT NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    acked_at      BIGINT,
    ack_status    TEXT NOT NULL DEFAULT '',
    ack_reason    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (agent, seq)
);

CREATE TABLE policies (
    version    INTEGER PRIMARY KEY,
    yaml       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    applied_by TEXT NOT NULL
);

CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL DEFAULT '',
    agent      TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    grant_id   TEXT NOT NULL DEFAULT '',
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_at ON audit(at);
CREATE INDEX audit_agent ON audit(agent, seq);
CREATE INDEX audit_subject ON audit(subject, seq);
CREATE INDEX audit_grant ON audit(grant_id);

-- The chain's head, one row: every transaction that audits locks it (SELECT ... FOR UPDATE),
-- chains onto it and moves it before commit, so replicas extend one chain with no fork or gap.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE revoked_certificates (
    serial     TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT ''
);

CREATE TABLE locks (
    id          TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    agent       TEXT NOT NULL,
    action      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    lifted_at   BIGINT,
    lifted_by   TEXT NOT NULL DEFAULT '',
    lift_reason TEXT NOT NULL DEFAULT '',
    CHECK (subject <> '' OR agent <> '' OR action <> '')
);
CREATE INDEX locks_open ON locks(created_at) WHERE lifted_at IS NULL;

CREATE TABLE checkpoints (
    id        BIGSERIAL PRIMARY KEY,
    seq       BIGINT NOT NULL,
    hash      TEXT NOT NULL,
    at        BIGINT NOT NULL,
    key_id    TEXT NOT NULL,
    signature BYTEA NOT NULL
);
