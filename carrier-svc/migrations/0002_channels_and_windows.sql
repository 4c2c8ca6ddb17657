-- Channel adapters and delivery windows: contact details for e-mail and SNS,
-- rich content and windows on deliveries, unsupported (state 5) and expired
-- receipts, per-person counts (a person reached on two channels is one send).

ALTER TABLE subscribers ADD COLUMN email TEXT NOT NULL DEFAULT '';
ALTER TABLE subscribers ADD COLUMN sns_handle TEXT NOT NULL DEFAULT '';

ALTER TABLE deliveries ADD COLUMN subject TEXT NOT NULL DEFAULT '';
-- Suggested replies joined by newlines.
ALTER TABLE deliveries ADD COLUMN suggested_replies TEXT NOT NULL DEFAULT '';
-- chukei_proto::window::Window in its stored form; NULL: no window.
ALTER TABLE deliveries ADD COLUMN delivery_window TEXT;
-- The current opening of the window closes then; held rows roll to the next one.
ALTER TABLE deliveries ADD COLUMN window_close BIGINT NOT NULL DEFAULT 9223372036854775807;
-- SMS parts this delivery takes (0 on other channels).
ALTER TABLE deliveries ADD COLUMN sms_segments BIGINT NOT NULL DEFAULT 0;
-- The relay says this is the person's only attempt for the message here:
-- counted directly, without the per-person `reach` bookkeeping.
ALTER TABLE deliveries ADD COLUMN single_attempt BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX deliveries_held_windows ON deliveries (window_close) WHERE state = 0;

ALTER TABLE outbox ADD COLUMN delivery_id TEXT NOT NULL DEFAULT '';

ALTER TABLE message_counts ADD COLUMN sms_segments BIGINT NOT NULL DEFAULT 0;
ALTER TABLE message_counts ADD COLUMN unsupported BIGINT NOT NULL DEFAULT 0;
ALTER TABLE message_counts ADD COLUMN expired BIGINT NOT NULL DEFAULT 0;

-- Who was reached with what: sends and opens are counted once per person.
CREATE TABLE reach (
    message_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    opened     BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (message_id, user_id)
);
