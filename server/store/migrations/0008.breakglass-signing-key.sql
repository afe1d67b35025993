-- The command-signing key that signed each break-glass code (docs/wire.md, "Break-glass
-- codes"): while a code is neither used nor expired, the coordinator keeps announcing that key to
-- the code's agent after a rotation, for codes only, until the last such code expires. '' for
-- codes issued before this column (attributed to the keys current when they were issued).
-- depends: 0007.breakglass

ALTER TABLE breakglass_codes ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
-- The usable codes, read (grouped by agent and key) when agents are welcomed.
CREATE INDEX breakglass_codes_unused ON breakglass_codes(expires_at) WHERE used_at IS NULL;
