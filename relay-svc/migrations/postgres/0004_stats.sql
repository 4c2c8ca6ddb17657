-- Aggregates of the events, so statistics and learning never scan the
-- events. Receipts and hand-overs only queue the keys of the events they
-- really added (`rollup_queue`, in their own transaction); the relay's
-- rollup worker folds queued events into the tables below in large batches
-- (storage/stats.rs), off the delivery path.
--
-- Hours are hours since the epoch (UTC) and days days since the epoch, so
-- any time zone can be applied when reading.
CREATE TABLE rollup_queue (
    seq        BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    kind       BIGINT NOT NULL
);

-- Sends (hand-overs), deliveries and opens of one enterprise's messages by
-- time, channel, carrier and place.
CREATE TABLE stats_cells (
    enterprise_id TEXT NOT NULL,
    -- The hour the person's first attempt was handed to the carrier.
    send_hour     BIGINT NOT NULL,
    channel       BIGINT NOT NULL,
    carrier_id    TEXT NOT NULL,
    -- Where the terminal was when the message reached it (deliveries) or was
    -- opened (opens); '' for sends.
    place         TEXT NOT NULL,
    -- The hour of the open; -1 for sends and deliveries.
    open_hour     BIGINT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, send_hour, channel, carrier_id, place, open_hour)
);

-- The same events by the person's consented attributes (as consented when
-- the event happened; '' / -1: not shared) and the day of the send.
CREATE TABLE stats_audience (
    enterprise_id TEXT NOT NULL,
    send_day      BIGINT NOT NULL,
    channel       BIGINT NOT NULL,
    gender        TEXT NOT NULL,
    -- The start of the consented age decade; -1 when not shared at that precision.
    age_band      BIGINT NOT NULL,
    region        TEXT NOT NULL,
    occupation    TEXT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, send_day, channel, gender, age_band, region, occupation)
);

-- Per enterprise, person and channel: the per-ref breakdown, and the evidence
-- the channel choices read (a person's history across enterprises by user_id).
CREATE TABLE person_channels (
    enterprise_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    channel       BIGINT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, user_id, channel)
);
CREATE INDEX person_channels_by_user ON person_channels (user_id, channel);

-- Per person, hub-wide: opens by hour of day (UTC), for sending at the
-- hour a person reads; and where their terminal was last seen, for place and
-- hour targeting.
CREATE TABLE person_hours (
    user_id TEXT NOT NULL,
    hour    BIGINT NOT NULL,
    opened  BIGINT NOT NULL,
    PRIMARY KEY (user_id, hour)
);
CREATE TABLE person_places (
    user_id TEXT PRIMARY KEY,
    place   TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);

-- A per-person send time (policy::SendTime, encoded); NULL: none.
ALTER TABLE messages ADD COLUMN send_time TEXT;

-- The events so far are folded in by the worker like new ones.
INSERT INTO rollup_queue (message_id, user_id, kind)
SELECT message_id, user_id, kind FROM events WHERE kind IN (1, 2, 3) ORDER BY at;

-- Opens per person and channel now live in person_channels.
DROP TABLE channel_opens;
