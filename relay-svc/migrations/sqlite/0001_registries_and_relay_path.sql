-- The relay's first schema: tenants, carriers, the three registries, messages,
-- deliveries, deduplicated events and carrier count reports.
-- Times are unix milliseconds taken from the relay's clock.

CREATE TABLE enterprises (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    api_key_hash TEXT NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL
);

CREATE TABLE services (
    id            TEXT PRIMARY KEY,
    enterprise_id TEXT NOT NULL REFERENCES enterprises (id),
    name          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    UNIQUE (enterprise_id, name)
);

CREATE TABLE carriers (
    id         TEXT PRIMARY KEY,
    endpoint   TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- First storage (D1): who registered with which enterprise, under which pseudonymous ref.
CREATE TABLE registrations (
    enterprise_id TEXT NOT NULL REFERENCES enterprises (id),
    user_id       TEXT NOT NULL,
    user_ref      TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, user_id),
    UNIQUE (enterprise_id, user_ref)
);

-- D1 per service: a registration may also name one or more of the enterprise's services.
CREATE TABLE service_registrations (
    service_id    TEXT NOT NULL REFERENCES services (id),
    user_id       TEXT NOT NULL,
    enterprise_id TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    PRIMARY KEY (service_id, user_id)
);
CREATE INDEX service_registrations_by_user ON service_registrations (enterprise_id, user_id);

-- Second storage (D2): which carrier(s) each user is contracted with; one primary.
CREATE TABLE contracts (
    user_id    TEXT NOT NULL,
    carrier_id TEXT NOT NULL REFERENCES carriers (id),
    is_primary BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, carrier_id)
);

-- Third storage (D3): only the attributes a user consented to share with one enterprise.
CREATE TABLE profiles (
    enterprise_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    gender        TEXT,
    age_min       BIGINT,
    age_max       BIGINT,
    region        TEXT,
    occupation    TEXT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, user_id)
);

-- Every consent change: which fields (never their values), when, via which carrier.
CREATE TABLE consent_records (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    enterprise_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    carrier_id    TEXT NOT NULL,
    fields        TEXT NOT NULL,
    recorded_at   BIGINT NOT NULL
);

CREATE TABLE messages (
    id                TEXT PRIMARY KEY,
    enterprise_id     TEXT NOT NULL REFERENCES enterprises (id),
    idempotency_key   TEXT NOT NULL,
    fingerprint       TEXT NOT NULL,
    target_kind       TEXT NOT NULL,
    target_service_id TEXT,
    seg_gender        TEXT,
    seg_age_min       BIGINT,
    seg_age_max       BIGINT,
    seg_regions       TEXT,
    seg_occupations   TEXT,
    content_text      TEXT NOT NULL,
    media_url         TEXT NOT NULL,
    channel           BIGINT NOT NULL,
    all_carriers      BOOLEAN NOT NULL,
    state             BIGINT NOT NULL,
    matched           BIGINT,
    accepted_at       BIGINT NOT NULL,
    not_before        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    UNIQUE (enterprise_id, idempotency_key)
);
CREATE INDEX messages_by_state ON messages (state);

-- One row per message x user x carrier; handed over in batches by the carrier's dispatcher.
CREATE TABLE deliveries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    carrier_id TEXT NOT NULL,
    state      BIGINT NOT NULL,
    UNIQUE (message_id, user_id, carrier_id)
);
CREATE INDEX deliveries_due ON deliveries (carrier_id, state, id);

-- Deduplicated evidence: every count derives from this table.
CREATE TABLE events (
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    kind       BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    carrier_id TEXT NOT NULL,
    channel    BIGINT NOT NULL,
    region     TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id, kind)
);

-- The latest count report of each carrier for each message.
CREATE TABLE count_reports (
    carrier_id  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    sent        BIGINT NOT NULL,
    opened      BIGINT NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (carrier_id, message_id)
);
