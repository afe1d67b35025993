-- A counter that every change to who may call, and as whom, moves (users, operator tokens,
-- revoked certificates), kept by the database itself so that no writer can forget it: the
-- coordinator caches what a credential stands for and checks this one value on each call
-- instead of looking the credential up (docs/performance.md), so a disable or a revoke takes
-- effect on the very next call, in every process that shares the database. No row yet reads as
-- 0 (a database copied by migrate-store brings its own).
-- depends: 0004.grant-extensions

CREATE TRIGGER identity_generation_users_insert AFTER INSERT ON users BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_users_update AFTER UPDATE ON users BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_users_delete AFTER DELETE ON users BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_tokens_insert AFTER INSERT ON tokens BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_tokens_update AFTER UPDATE ON tokens BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_tokens_delete AFTER DELETE ON tokens BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_certificates_insert AFTER INSERT ON revoked_certificates BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_certificates_update AFTER UPDATE ON revoked_certificates BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
CREATE TRIGGER identity_generation_certificates_delete AFTER DELETE ON revoked_certificates BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1;
END;
