-- A join token may name the enrolled agent it is allowed to enroll again (a reinstalled host);
-- without it, a name in use is refused.
ALTER TABLE join_tokens ADD COLUMN replaces TEXT;

-- Operator client certificates refused from their next call on (serial in lower-case hex).
CREATE TABLE revoked_certificates (
    serial     TEXT PRIMARY KEY,
    revoked_at INTEGER NOT NULL,
    revoked_by TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT ''
);
