-- The index of scheduled requests by start (the expiry loop's due_scheduled and next_deadline).
-- It was first added by editing 0004.grant-extensions after that migration had been applied, so
-- databases migrated before the edit lack it and those migrated after have it: IF NOT EXISTS
-- serves both. Applied migrations are never edited (docs/wire.md, "Mixed versions").
-- depends: 0004.grant-extensions

CREATE INDEX IF NOT EXISTS requests_scheduled ON requests(start_at) WHERE state = 'SCHEDULED';
