-- Every outbox event gets the next number of a per-agent counter (meta key event_counter), so the
-- coordinator can tell when events went missing.
ALTER TABLE outbox ADD COLUMN counter INTEGER NOT NULL DEFAULT 0;
