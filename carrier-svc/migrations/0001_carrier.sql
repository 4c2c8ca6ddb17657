-- A carrier's own store: subscribers, where their terminals are attached,
-- deliveries received from the relay (held until pushed), the receipt outbox
-- towards the relay, and per-message counts for the periodic report.
-- Times are unix milliseconds from the carrier's clock.

CREATE TABLE subscribers (
    user_id      TEXT PRIMARY KEY,
    phone_number TEXT NOT NULL,
    name         TEXT NOT NULL,
    gender       BIGINT NOT NULL,
    birth_date   TEXT NOT NULL,
    region       TEXT NOT NULL,
    occupation   TEXT NOT NULL,
    is_primary   BOOLEAN NOT NULL,
    updated_at   BIGINT NOT NULL
);

CREATE TABLE attachments (
    user_id     TEXT PRIMARY KEY REFERENCES subscribers (user_id),
    endpoint    TEXT NOT NULL,
    attached_at BIGINT NOT NULL
);
CREATE INDEX attachments_by_endpoint ON attachments (endpoint);

-- state: 0 held, 1 pushed (awaiting the terminal), 2 delivered, 3 opened, 4 failed/expired.
CREATE TABLE deliveries (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT NOT NULL UNIQUE,
    message_id   TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    channel      BIGINT NOT NULL,
    content_text TEXT NOT NULL,
    media_url    TEXT NOT NULL,
    not_before   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    state        BIGINT NOT NULL,
    received_at  BIGINT NOT NULL
);
CREATE INDEX deliveries_by_state ON deliveries (state, seq);

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    kind       BIGINT NOT NULL,
    channel    BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    region     TEXT NOT NULL
);

CREATE TABLE message_counts (
    message_id TEXT PRIMARY KEY,
    sent       BIGINT NOT NULL,
    opened     BIGINT NOT NULL,
    dirty      BOOLEAN NOT NULL
);
