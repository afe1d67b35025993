-- Rate limits shared by the replicas (as server/store/migrations/0010.rate-buckets.sql): one
-- token bucket per (limiter, caller), taken from and refilled by one upsert.

CREATE TABLE rate_buckets (
    limiter TEXT NOT NULL,
    caller TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL,
    refusals INTEGER NOT NULL,
    rate DOUBLE PRECISION NOT NULL,
    burst DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (limiter, caller)
);
