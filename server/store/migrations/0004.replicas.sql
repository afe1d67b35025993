-- Coordinator replicas sharing one store (PostgreSQL; a SQLite coordinator is its one replica),
-- and which replica holds each agent's stream.
-- depends: 0003.shared-state

CREATE TABLE replicas (
    id           TEXT PRIMARY KEY,
    address      TEXT NOT NULL DEFAULT '',
    version      TEXT NOT NULL DEFAULT '',
    started_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL
);

ALTER TABLE agents ADD COLUMN replica TEXT NOT NULL DEFAULT '';

-- Shared key material, encrypted (used by PostgreSQL replicas; a SQLite coordinator keeps its
-- keys in its data directory). The same table on both stores keeps their schemas equal.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    ciphertext BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
