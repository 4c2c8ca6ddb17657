-- Status webhooks: an enterprise's endpoints, each with its own cursor in
-- the events log (the same log the rollup fold reads, migration 0012), so a
-- campaign's events reach an endpoint in batches and no row is written per
-- event for it.
CREATE TABLE webhook_endpoints (
    id               TEXT PRIMARY KEY,
    enterprise_id    TEXT NOT NULL,
    url              TEXT NOT NULL,
    -- Event types sent, a bit each (webhooks::EventType).
    types            BIGINT NOT NULL,
    -- Only events of this message ('' for all).
    message_id       TEXT NOT NULL DEFAULT '',
    -- "whsec_…" (Standard Webhooks); the previous one also signs until
    -- previous_until, so a receiver can switch over.
    secret           TEXT NOT NULL,
    previous_secret  TEXT,
    previous_until   BIGINT,
    -- 0 enabled, 1 disabled (disabled_reason says why).
    state            BIGINT NOT NULL DEFAULT 0,
    disabled_reason  TEXT NOT NULL DEFAULT '',
    -- Events up to (log_tx, log_seq) were delivered (or not for this endpoint).
    log_tx           BIGINT NOT NULL,
    log_seq          BIGINT NOT NULL,
    -- The batch being delivered: through (batch_tx, batch_seq), sent with
    -- this webhook id; retried as it is until it is answered 2xx.
    batch_id         TEXT,
    batch_tx         BIGINT,
    batch_seq        BIGINT,
    -- Its events, and when the oldest of them happened.
    batch_events     BIGINT,
    batch_since      BIGINT,
    -- Failed attempts of the batch so far, since when, and when to try next.
    failures         BIGINT NOT NULL DEFAULT 0,
    failing_since    BIGINT,
    next_attempt_at  BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_by_enterprise ON webhook_endpoints (enterprise_id);

-- The next per-message sequence number on each endpoint: events of one
-- message reach an endpoint numbered 1, 2, 3… without gaps.
CREATE TABLE webhook_sequences (
    endpoint_id TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    next        BIGINT NOT NULL,
    PRIMARY KEY (endpoint_id, message_id)
);

-- Every delivery attempt, for the enterprise to read (and the operator's
-- metrics); no event content is kept here.
CREATE TABLE webhook_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL,
    webhook_id  TEXT NOT NULL,
    at          BIGINT NOT NULL,
    events      BIGINT NOT NULL,
    -- The HTTP status (0: no answer).
    status      BIGINT NOT NULL,
    -- delivered, failed, disabled.
    outcome     TEXT NOT NULL,
    duration_ms BIGINT NOT NULL,
    error       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX webhook_attempts_by_endpoint ON webhook_attempts (endpoint_id, id);
