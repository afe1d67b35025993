-- The command-signing key that signed each break-glass code (as
-- server/store/migrations/0008.breakglass-signing-key.sql): announced to the code's agent after a
-- rotation, for codes only, until the last unused code it signed expires. '' for codes issued
-- before this column (attributed to the keys current when they were issued).

ALTER TABLE breakglass_codes ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
-- The usable codes, read (grouped by agent and key) when agents are welcomed.
CREATE INDEX breakglass_codes_unused ON breakglass_codes(expires_at) WHERE used_at IS NULL;
