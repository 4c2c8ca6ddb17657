-- The registries' version: every change to who is registered with which
-- enterprise under which ref (`registrations`) or contracted with which
-- carrier (`contracts`) moves it, in the transaction that makes the
-- change, whatever the write path and whichever replica. The relay keeps
-- the refs it resolved for targeted messages in memory with the version
-- they were read at, and forgets them all once the version moved
-- (`storage/ref_cache.rs`).
CREATE TABLE registry_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  BIGINT NOT NULL
);
INSERT INTO registry_version (id, n) VALUES (1, 0);

-- Moved once per transaction, at its commit: the version's row is locked
-- only after every other lock the transaction takes, so two registry
-- writers never wait for each other's rows in opposite orders (a statement
-- trigger locked it mid-transaction). Deferred triggers are per row; a
-- transaction-local setting makes all but the first return at once.
CREATE FUNCTION registry_version_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('chukei.registry_moved', true) = 'yes' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('chukei.registry_moved', 'yes', true);
    UPDATE registry_version SET n = n + 1;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER registrations_version AFTER INSERT OR UPDATE OR DELETE ON registrations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION registry_version_moved();
CREATE CONSTRAINT TRIGGER contracts_version AFTER INSERT OR UPDATE OR DELETE ON contracts
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION registry_version_moved();
