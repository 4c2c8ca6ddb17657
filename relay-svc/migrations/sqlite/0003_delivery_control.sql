-- Delivery control: per-message policy, window, expiry, follow-up and
-- priority; per-delivery attempts (channel, attempt number, timing, why);
-- quiet periods around targeted messages; per-person engagement for fatigue.

ALTER TABLE messages ADD COLUMN subject TEXT NOT NULL DEFAULT '';
-- Suggested replies joined by newlines.
ALTER TABLE messages ADD COLUMN suggested_replies TEXT NOT NULL DEFAULT '';
-- fixed, most_used, fallback, multi, resend, best.
ALTER TABLE messages ADD COLUMN policy TEXT NOT NULL DEFAULT 'fixed';
-- Channel numbers in order, comma-separated; empty: the carrier's default.
ALTER TABLE messages ADD COLUMN channels TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN timeout_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN max_resends BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN resend_until_delivered BOOLEAN NOT NULL DEFAULT FALSE;
-- chukei_proto::window::Window in its stored form; NULL: no window.
ALTER TABLE messages ADD COLUMN delivery_window TEXT;
ALTER TABLE messages ADD COLUMN window_at_carrier BOOLEAN NOT NULL DEFAULT FALSE;
-- 1 low, 2 normal, 3 high.
ALTER TABLE messages ADD COLUMN priority BIGINT NOT NULL DEFAULT 2;
-- The message-level decision, in words (policy, estimate, window, expiry).
ALTER TABLE messages ADD COLUMN plan TEXT NOT NULL DEFAULT '';
-- The follow-up message sent to whoever opens this one, and after how long.
ALTER TABLE messages ADD COLUMN follow_up_id TEXT;
ALTER TABLE messages ADD COLUMN follow_up_delay_ms BIGINT NOT NULL DEFAULT 0;
-- Set once the expiry sweep has run after expires_at.
ALTER TABLE messages ADD COLUMN closed BOOLEAN NOT NULL DEFAULT FALSE;
-- The policy makes at most one attempt per person and carrier, so carriers
-- may count each delivery as a person (no per-person bookkeeping).
ALTER TABLE messages ADD COLUMN single_attempt BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX messages_open_by_expiry ON messages (closed, expires_at);
ALTER TABLE count_reports ADD COLUMN sms_segments BIGINT NOT NULL DEFAULT 0;

-- SQLite cannot change a table's unique key in place: rebuild deliveries.
CREATE TABLE deliveries_v3 (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    carrier_id     TEXT NOT NULL,
    -- 0 the carrier's default channel.
    channel        BIGINT NOT NULL DEFAULT 0,
    -- 0 for the first send; fallback and resend attempts count up.
    attempt        BIGINT NOT NULL DEFAULT 0,
    -- 0 pending (may go now), 1 handed over, 2 unsupported, 3 expired, 4 cancelled,
    -- 5 skipped, 6 waiting (for not_before).
    state          BIGINT NOT NULL,
    -- Held at the relay until then (window opening, quiet period, follow-up delay).
    not_before     BIGINT NOT NULL DEFAULT 0,
    -- A window held at the relay closes then (NULL: none, or handed over);
    -- rows still pending then roll to the next opening.
    window_close   BIGINT,
    -- When the policy looks at this attempt again (fallback/resend timer, unsupported).
    check_at       BIGINT,
    handed_over_at BIGINT,
    -- Why this attempt exists, and what was decided about it since.
    reason         TEXT NOT NULL DEFAULT '',
    note           TEXT NOT NULL DEFAULT '',
    UNIQUE (message_id, user_id, carrier_id, channel, attempt)
);
INSERT INTO deliveries_v3 (id, message_id, user_id, carrier_id, state, handed_over_at)
    SELECT id, message_id, user_id, carrier_id, state, NULL FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_v3 RENAME TO deliveries;
CREATE INDEX deliveries_due ON deliveries (carrier_id, state, id);
CREATE INDEX deliveries_timers ON deliveries (check_at) WHERE check_at IS NOT NULL;
CREATE INDEX deliveries_held ON deliveries (window_close) WHERE window_close IS NOT NULL;
-- Waiting rows are released to pending (state 0) when their time comes, so
-- dispatchers only ever read deliveries that may go now.
CREATE INDEX deliveries_waiting ON deliveries (not_before) WHERE state = 6;
-- Quiet periods look up a person's deliveries that have not gone yet.
CREATE INDEX deliveries_unsent_by_user ON deliveries (user_id) WHERE state IN (0, 6);

-- Opens per person and channel, kept beside the events they count: the
-- history "most used channel" reads (a primary-key lookup per person).
CREATE TABLE channel_opens (
    user_id TEXT NOT NULL,
    channel BIGINT NOT NULL,
    opens   BIGINT NOT NULL,
    PRIMARY KEY (user_id, channel)
);

-- A targeted message holds the person's other (campaign) messages off
-- around its send time.
CREATE TABLE quiet_periods (
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    starts_at  BIGINT NOT NULL,
    ends_at    BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
CREATE INDEX quiet_periods_by_user ON quiet_periods (user_id, ends_at);

-- Per person, hub-wide: an open-rate trend (per mille, an exponentially
-- weighted average of "opened" per campaign send) and today's campaign sends.
CREATE TABLE engagement (
    user_id TEXT PRIMARY KEY,
    score   BIGINT NOT NULL,
    day     BIGINT NOT NULL,
    planned BIGINT NOT NULL
);
