-- Break-glass codes voided before use because the key that signed them leaked
-- (`jitmesh-coordinator rotate-signing-key --compromised`): never announced for, never adopted.
-- depends: 0008.breakglass-signing-key 0008.lock-handout

ALTER TABLE breakglass_codes ADD COLUMN voided_at INTEGER;
