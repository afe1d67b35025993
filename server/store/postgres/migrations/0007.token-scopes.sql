-- What a token may do (as server/store/migrations/0005.token-scopes.sql): '' = everything its
-- user may do; otherwise space-separated scopes ("review-on-behalf").

ALTER TABLE tokens ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
