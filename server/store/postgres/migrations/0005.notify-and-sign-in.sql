-- Notifications and single sign-on (as server/store/migrations/0003.notify-and-sign-in.sql):
-- the outbox (written in the audit event's own transaction), receivers with their routes,
-- per-receiver deliveries and every attempt; users managed by admins or the identity provider.

CREATE TABLE outbox (
    seq        BIGSERIAL PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    agent      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    grant_id   TEXT NOT NULL,
    details    TEXT NOT NULL
);

CREATE TABLE receivers (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    settings   TEXT NOT NULL,
    secret     TEXT NOT NULL,
    route      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE deliveries (
    event_seq     BIGINT NOT NULL REFERENCES outbox(seq),
    receiver      TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       BIGINT NOT NULL,
    claimed_until BIGINT NOT NULL DEFAULT 0,
    last_error    TEXT NOT NULL DEFAULT '',
    delivered_at  BIGINT,
    PRIMARY KEY (event_seq, receiver)
);
CREATE INDEX deliveries_due ON deliveries(next_at) WHERE state = 'PENDING';

CREATE TABLE delivery_attempts (
    id        BIGSERIAL PRIMARY KEY,
    event_seq BIGINT NOT NULL,
    receiver  TEXT NOT NULL,
    attempt   INTEGER NOT NULL,
    at        BIGINT NOT NULL,
    ok        INTEGER NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX delivery_attempts_event ON delivery_attempts(event_seq);

ALTER TABLE users ADD COLUMN managed_by TEXT NOT NULL DEFAULT 'local';
