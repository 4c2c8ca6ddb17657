-- The registries' version: every change to who is registered with which
-- enterprise under which ref (`registrations`) or contracted with which
-- carrier (`contracts`) moves it, in the transaction that makes the
-- change, whatever the write path. The relay keeps the refs it resolved
-- for targeted messages in memory with the version they were read at, and
-- forgets them all once the version moved (`storage/ref_cache.rs`).
CREATE TABLE registry_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  BIGINT NOT NULL
);
INSERT INTO registry_version (id, n) VALUES (1, 0);

CREATE TRIGGER registrations_added_version AFTER INSERT ON registrations
BEGIN UPDATE registry_version SET n = n + 1; END;
CREATE TRIGGER registrations_changed_version AFTER UPDATE ON registrations
BEGIN UPDATE registry_version SET n = n + 1; END;
CREATE TRIGGER registrations_removed_version AFTER DELETE ON registrations
BEGIN UPDATE registry_version SET n = n + 1; END;
CREATE TRIGGER contracts_added_version AFTER INSERT ON contracts
BEGIN UPDATE registry_version SET n = n + 1; END;
CREATE TRIGGER contracts_changed_version AFTER UPDATE ON contracts
BEGIN UPDATE registry_version SET n = n + 1; END;
CREATE TRIGGER contracts_removed_version AFTER DELETE ON contracts
BEGIN UPDATE registry_version SET n = n + 1; END;
