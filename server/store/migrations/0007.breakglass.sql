-- Break-glass codes (docs/wire.md, "Break-glass codes"): what each allows and its own expiry,
-- never the code itself (only its SHA-256); once an agent reported the use, the grant it made;
-- once an admin looked at it, the review. A grant adopted from a code names it.
-- depends: 0006.requests-scheduled-index

CREATE TABLE breakglass_codes (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    action      TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    issued_at   INTEGER NOT NULL,
    issued_by   TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    code_hash   TEXT NOT NULL,
    used_at     INTEGER,
    grant_id    TEXT NOT NULL DEFAULT '',
    used_by     TEXT NOT NULL DEFAULT '',
    reviewed_at INTEGER,
    reviewed_by TEXT NOT NULL DEFAULT '',
    review_note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX breakglass_codes_unreviewed ON breakglass_codes(used_at)
    WHERE used_at IS NOT NULL AND reviewed_at IS NULL;

ALTER TABLE grants ADD COLUMN breakglass_code_id TEXT NOT NULL DEFAULT '';
