-- Notifications: the outbox (written in the same transaction as the audit event it comes from),
-- receivers with their routes (shared by every coordinator replica), per-receiver deliveries
-- and every attempt made.
-- depends: 0002.locks

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    agent      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    grant_id   TEXT NOT NULL,
    details    TEXT NOT NULL
);

-- `settings`: JSON without secrets. `secret`: sealed with the coordinator's notify key, or
-- `file:<path>` read when sending. `route`: JSON (kinds, labels, actions, rules, requester).
CREATE TABLE receivers (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    settings   TEXT NOT NULL,
    secret     TEXT NOT NULL,
    route      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL
);

-- state: PENDING (to try at next_at), DELIVERED, GAVE_UP. A claim (claimed_until in the future)
-- keeps other senders off a delivery while one tries it.
CREATE TABLE deliveries (
    event_seq     INTEGER NOT NULL REFERENCES outbox(seq),
    receiver      TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_at       INTEGER NOT NULL,
    claimed_until INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT NOT NULL DEFAULT '',
    delivered_at  INTEGER,
    PRIMARY KEY (event_seq, receiver)
);
CREATE INDEX deliveries_due ON deliveries(next_at) WHERE state = 'PENDING';

CREATE TABLE delivery_attempts (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq INTEGER NOT NULL,
    receiver  TEXT NOT NULL,
    attempt   INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    ok        INTEGER NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX delivery_attempts_event ON delivery_attempts(event_seq);

-- Single sign-on: a user is managed either by admins ('local': groups set with jitctl) or by
-- the identity provider ('oidc': groups taken from the ID token at each sign-in), never both.
ALTER TABLE users ADD COLUMN managed_by TEXT NOT NULL DEFAULT 'local';
