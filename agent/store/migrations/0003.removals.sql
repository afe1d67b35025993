-- Removals still owed to the host: a lease ended (revoked, snapshot, fail-closed start) but the
-- enforcers could not take its (subject, action) away. The lease row is no longer active (it
-- grants nothing); this row keeps the agent retrying the removal across restarts, reporting the
-- grants REVOKE_FAILED once the attempts ran out, and removed only once a removal succeeded.
CREATE TABLE removals (
    subject    TEXT NOT NULL,
    action     TEXT NOT NULL,
    -- JSON list of the grant ids whose end this removal completes (empty for drift).
    grant_ids  TEXT NOT NULL DEFAULT '[]',
    attempts   INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL,
    since_ms   INTEGER NOT NULL,
    error      TEXT NOT NULL DEFAULT '',
    reported   INTEGER NOT NULL DEFAULT 0 CHECK (reported IN (0, 1)),
    PRIMARY KEY (subject, action)
);
