-- Deliver protocol version 2: a batch from the relay is kept as it came, one
-- row per message record (its recipients packed in a blob, see
-- `carrier_svc::packed`), and what happened to each recipient is one byte of
-- `states` (0 held, 1 pushed and awaiting the terminal, 2 delivered,
-- 3 opened, 4 expired, 5 unsupported, 6 dropped on erasure). Replaces the
-- row per delivery; `held` and `pushed` count the row's recipients in those
-- states, so the push and the sweeps read only rows with work left.
CREATE TABLE batches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id        TEXT NOT NULL,
    priority          BOOLEAN NOT NULL,
    single_attempt    BOOLEAN NOT NULL,
    content_text      TEXT NOT NULL,
    media_url         TEXT NOT NULL,
    subject           TEXT NOT NULL,
    -- Suggested replies joined by newlines.
    suggested_replies TEXT NOT NULL,
    -- SMS parts the text takes (for recipients on SMS).
    sms_segments      BIGINT NOT NULL,
    -- chukei_proto::window::Window in its stored form; NULL: no window.
    delivery_window   TEXT,
    -- The window's current (or next) opening: recipients are held until it
    -- opens and roll to the next opening when it closes.
    window_open       BIGINT NOT NULL,
    window_close      BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    trace_parent      TEXT NOT NULL,
    -- The lowest and highest relay delivery id in the row: terminal events
    -- find their row by message and id.
    min_id            BIGINT NOT NULL,
    max_id            BIGINT NOT NULL,
    recipients        BLOB NOT NULL,
    states            BLOB NOT NULL,
    held              BIGINT NOT NULL,
    pushed            BIGINT NOT NULL,
    received_at       BIGINT NOT NULL
);
CREATE INDEX batches_held ON batches (priority, seq) WHERE held > 0;
CREATE INDEX batches_unconfirmed ON batches (seq) WHERE pushed > 0;
CREATE INDEX batches_open_by_expiry ON batches (expires_at) WHERE held > 0 OR pushed > 0;
CREATE INDEX batches_by_message ON batches (message_id, min_id);

-- Receipts for the relay, one row per group queued together (a blob).
CREATE TABLE receipt_outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    receipts BLOB NOT NULL,
    count    BIGINT NOT NULL
);

-- The per-delivery tables of version 1 stay as they were; start-up moves
-- what they still hold (held or pushed deliveries, unsent receipts) into the
-- tables above, and the ids they name still count as seen.
ALTER TABLE deliveries RENAME TO deliveries_v1;
ALTER TABLE outbox RENAME TO outbox_v1;
