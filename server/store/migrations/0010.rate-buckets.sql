-- Rate limits shared by the replicas on one store (server/rpc/limits.py, SharedRateLimiter):
-- one token bucket per (limiter, caller), taken from and refilled by one statement
-- (`Queries.take_token`). A SQLite coordinator is one process and keeps its buckets in memory;
-- the table is here so both stores keep the same schema (tests/store/test_schema.py).
-- `rate` is tokens per millisecond, `at_ms` when the bucket was last counted, `refusals` the
-- calls refused in a row since the last one allowed (1: the first of a run).
-- depends: 0009.breakglass-void

CREATE TABLE rate_buckets (
    limiter TEXT NOT NULL,
    caller TEXT NOT NULL,
    tokens REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    refusals INTEGER NOT NULL,
    rate REAL NOT NULL,
    burst REAL NOT NULL,
    PRIMARY KEY (limiter, caller)
);
