-- What each subscriber chose to share with each enterprise, as this carrier
-- forwarded it to the relay (the consent page shows and changes it), and the
-- history of those choices. Written after the relay accepted the change.
-- Choices: age 1 none, 2 exact, 3 decade; region 1 none, 2 prefecture,
-- 3 city (`chukei.carrier.v1.AgeGranularity` / `RegionGranularity`).
CREATE TABLE consents (
    user_id       TEXT NOT NULL REFERENCES subscribers (user_id),
    enterprise_id TEXT NOT NULL,
    gender        BOOLEAN NOT NULL,
    age           BIGINT NOT NULL,
    region        BIGINT NOT NULL,
    occupation    BOOLEAN NOT NULL,
    text_version  TEXT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (user_id, enterprise_id)
);

-- action: registered, changed, left (an enterprise, or with service_id one
-- of its services), left_hub (enterprise_id '').
CREATE TABLE consent_history (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       TEXT NOT NULL,
    enterprise_id TEXT NOT NULL,
    service_id    TEXT NOT NULL,
    action        TEXT NOT NULL,
    gender        BOOLEAN NOT NULL,
    age           BIGINT NOT NULL,
    region        BIGINT NOT NULL,
    occupation    BOOLEAN NOT NULL,
    text_version  TEXT NOT NULL,
    at            BIGINT NOT NULL
);
CREATE INDEX consent_history_by_user ON consent_history (user_id, seq);

-- Sign-in to the consent page starts from the phone number.
CREATE INDEX subscribers_by_phone ON subscribers (phone_number);
