-- The identity generation (as server/store/migrations/0007.identity-generation.sql): moved by
-- every statement that changes users, operator tokens or revoked certificates, on any replica,
-- in the changing transaction itself.

CREATE FUNCTION bump_identity_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meta (key, value) VALUES ('identity_generation', '1')
        ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + 1)::text;
    RETURN NULL;
END
$$;

CREATE TRIGGER identity_generation_users AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION bump_identity_generation();
CREATE TRIGGER identity_generation_tokens AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tokens
    FOR EACH STATEMENT EXECUTE FUNCTION bump_identity_generation();
CREATE TRIGGER identity_generation_certificates
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON revoked_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION bump_identity_generation();
