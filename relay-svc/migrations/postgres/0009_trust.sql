-- Trust: what people consented to and when, what was erased, who did what
-- (a hash-chained audit log), which API keys are live, and what carriers
-- must still be told.

-- Messages that chose their people by consented attributes (a segment, and
-- follow-ups of one): who received them is never shown per person.
ALTER TABLE messages ADD COLUMN by_attributes BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE messages SET by_attributes = TRUE WHERE target_kind = 'segment';
UPDATE messages SET by_attributes = TRUE
 WHERE target_kind = 'follow_up'
   AND substr(idempotency_key, 11) IN (SELECT id FROM messages WHERE target_kind = 'segment');

-- Per enterprise, ref and channel, leaving out messages sent by attributes:
-- the per-person breakdown an enterprise may see.
CREATE TABLE person_refs (
    enterprise_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    channel       BIGINT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, user_id, channel)
);
INSERT INTO person_refs (enterprise_id, user_id, channel, sent, delivered, opened)
SELECT enterprise_id, user_id, channel, sent, delivered, opened FROM person_channels;

-- Which version of the consent text the person was shown.
ALTER TABLE consent_records ADD COLUMN text_version TEXT NOT NULL DEFAULT '';

-- A person erased from one enterprise (or, enterprise '', from the hub):
-- only a hash of the hub's user id is kept, so the erasure can be proven
-- without keeping who it was.
CREATE TABLE tombstones (
    user_hash     TEXT NOT NULL,
    enterprise_id TEXT NOT NULL,
    carrier_id    TEXT NOT NULL,
    erased_at     BIGINT NOT NULL,
    PRIMARY KEY (user_hash, enterprise_id, erased_at)
);

-- What carriers must be told (erasures), sent on their Deliver streams and
-- deleted once acknowledged.
CREATE TABLE outbox (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    carrier_id    TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    enterprise_id TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX outbox_by_carrier ON outbox (carrier_id, id);

-- Append-only, hash-chained: each entry's hash covers its fields and the
-- previous entry's hash. `audit_head` holds the last one; appending takes
-- its row first, so entries are chained one at a time.
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY,
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '');

-- Enterprise API keys: several may be live at once while a key is rotated.
CREATE TABLE api_keys (
    key_hash      TEXT PRIMARY KEY,
    key_id        TEXT NOT NULL UNIQUE,
    enterprise_id TEXT NOT NULL REFERENCES enterprises (id),
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX api_keys_by_enterprise ON api_keys (enterprise_id);
INSERT INTO api_keys (key_hash, key_id, enterprise_id, created_at)
SELECT api_key_hash, 'key_' || substr(api_key_hash, 1, 12), id, created_at FROM enterprises;
