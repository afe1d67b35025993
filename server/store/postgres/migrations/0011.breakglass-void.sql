-- Break-glass codes voided before use because the key that signed them leaked (as
-- server/store/migrations/0009.breakglass-void.sql).

ALTER TABLE breakglass_codes ADD COLUMN voided_at BIGINT;
