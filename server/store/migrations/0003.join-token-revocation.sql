-- Join tokens can be listed and revoked (issue 10): a revoked token enrolls nothing from then
-- on. Each agent remembers the id (hash prefix) of the join token it enrolled with.
-- Depends on both migrations numbered 0002 (yoyo knows migrations by file name, so the applied
-- ones keep theirs).
-- depends: 0002.enrollment-and-certificates 0002.locks

ALTER TABLE join_tokens ADD COLUMN revoked_at INTEGER;
ALTER TABLE join_tokens ADD COLUMN revoked_by TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN join_token_id TEXT NOT NULL DEFAULT '';
