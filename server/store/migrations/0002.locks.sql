-- Locks: an emergency stop on a subject, an agent, an action or a combination ('' = any).
-- `subject` is stored case-folded; a lock is in force while lifted_at is NULL and it has not
-- reached expires_at.
-- depends: 0001.init

CREATE TABLE locks (
    id          TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    agent       TEXT NOT NULL,
    action      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    lifted_at   INTEGER,
    lifted_by   TEXT NOT NULL DEFAULT '',
    lift_reason TEXT NOT NULL DEFAULT '',
    CHECK (subject <> '' OR agent <> '' OR action <> '')
);
CREATE INDEX locks_open ON locks(created_at) WHERE lifted_at IS NULL;
