-- Break-glass codes used on this host (docs/wire.md, "Break-glass codes"): one row per code, so a
-- code makes at most one lease ("bg-" + code id) even across restarts. `code` is the whole
-- signed code as presented (the coordinator verifies it again when it adopts the lease);
-- `adopted` is set once a Welcome followed a Hello that reported it.
CREATE TABLE breakglass (
    code_id     TEXT PRIMARY KEY,
    grant_id    TEXT NOT NULL,
    code        BLOB NOT NULL,
    subject     TEXT NOT NULL,
    action      TEXT NOT NULL,
    caller      TEXT NOT NULL,
    used_at_ms  INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    adopted     INTEGER NOT NULL DEFAULT 0 CHECK (adopted IN (0, 1))
);

-- Locks the coordinator sent (LockCommand), kept until unlocked, replaced by a snapshot's
-- locks, or past expires_at. Empty subject or action matches any.
CREATE TABLE locks (
    lock_id       TEXT PRIMARY KEY,
    subject       TEXT NOT NULL DEFAULT '',
    action        TEXT NOT NULL DEFAULT '',
    expires_at_ms INTEGER,
    reason        TEXT NOT NULL DEFAULT ''
);
