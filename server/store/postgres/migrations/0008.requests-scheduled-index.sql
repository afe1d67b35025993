-- The index of scheduled requests by start (as server/store/migrations/0006): first added by
-- editing 0006.grant-extensions after it had been applied; IF NOT EXISTS serves databases
-- migrated before and after that edit.

CREATE INDEX IF NOT EXISTS requests_scheduled ON requests(start_at) WHERE state = 'SCHEDULED';
