-- Join tokens can be listed and revoked (as server/store/migrations/0003.join-token-revocation.sql):
-- a revoked token enrolls nothing from then on; each agent remembers the id (hash prefix) of the
-- join token it enrolled with.

ALTER TABLE join_tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE join_tokens ADD COLUMN revoked_by TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN join_token_id TEXT NOT NULL DEFAULT '';
