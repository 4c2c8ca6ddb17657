-- Per-message event counts, maintained in the same transaction as the events
-- they count, so reading a campaign's status does not scan its events.
CREATE TABLE message_counts (
    message_id TEXT NOT NULL,
    kind       BIGINT NOT NULL,
    count      BIGINT NOT NULL,
    PRIMARY KEY (message_id, kind)
);
