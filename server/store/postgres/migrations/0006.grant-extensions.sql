-- Extensions in place and multi-host/scheduled requests (as
-- server/store/migrations/0004.grant-extensions.sql).

ALTER TABLE grants ADD COLUMN extensions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE grants ADD COLUMN original_not_after BIGINT;

ALTER TABLE requests ADD COLUMN start_at BIGINT;
ALTER TABLE requests ADD COLUMN selector TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN grant_ids TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN reused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN extends_grant_id TEXT NOT NULL DEFAULT '';
