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

ALTER TABLE deliveries ADD COLUMN channel BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN attempt BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN not_before BIGINT NOT NULL DEFAULT 0;
-- A window held at the relay closes then (NULL: none, or handed over).
ALTER TABLE deliveries ADD COLUMN window_close BIGINT;
ALTER TABLE deliveries ADD COLUMN check_at BIGINT;
ALTER TABLE deliveries ADD COLUMN handed_over_at BIGINT;
ALTER TABLE deliveries ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE deliveries ADD COLUMN note TEXT NOT NULL DEFAULT '';
-- state: 0 pending (may go now), 1 handed over, 2 unsupported, 3 expired,
-- 4 cancelled, 5 skipped, 6 waiting (for not_before).
ALTER TABLE deliveries DROP CONSTRAINT deliveries_message_id_user_id_carrier_id_key;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_attempt_key UNIQUE (message_id, user_id, carrier_id, channel, attempt);
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
