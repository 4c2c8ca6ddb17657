-- Leases between relay replicas sharing one database: each carrier's
-- Deliver stream ("carrier:<id>") and the follow-through loop ("control")
-- are held by one replica at a time, renewed well within their time to
-- live; a replica that dies loses them when they expire.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    -- Unix ms of the holder's wall clock (not the relay's injectable clock:
    -- a lease is about whether a process is alive).
    expires_at BIGINT NOT NULL
);
