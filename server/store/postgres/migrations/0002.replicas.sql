-- Coordinator replicas sharing this store, and which replica holds each agent's stream.

CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    address      TEXT NOT NULL DEFAULT '',
    version      TEXT NOT NULL DEFAULT '',
    started_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);

ALTER TABLE agents ADD COLUMN replica TEXT NOT NULL DEFAULT '';

-- Shared key material (command-signing keys, the internal CA), encrypted by the replicas with
-- a key each reads from a file or the environment; the database never holds it in clear.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    ciphertext BYTEA NOT NULL,
    updated_at BIGINT NOT NULL
);
