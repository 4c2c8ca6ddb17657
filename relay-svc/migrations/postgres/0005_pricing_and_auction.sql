-- Pricing, billing and the capacity auction. Money is integer yen.

-- A price table is one published version of the prices: the operator's rate
-- card (base) and, when dynamic pricing is on, the prices moved by each
-- slot's open rate. A message keeps the version it was accepted under, so its
-- charge equals its quote unless it was a different version.
CREATE TABLE price_tables (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The IANA zone whose local hours are the slots.
    zone            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    -- Dynamic pricing bounds in percent of the base price (NULL: off), and
    -- the deliveries a slot needs before its rate moves its price.
    floor_percent   BIGINT,
    ceiling_percent BIGINT,
    min_deliveries  BIGINT NOT NULL DEFAULT 0,
    -- When dynamic prices were last recomputed from this table's base.
    checked_at      BIGINT NOT NULL
);

-- Every channel x local hour of a table: yen per delivered and per opened
-- message, the base they came from and the open rate behind them.
CREATE TABLE price_cells (
    table_id       BIGINT NOT NULL REFERENCES price_tables (id),
    channel        BIGINT NOT NULL,
    hour           BIGINT NOT NULL,
    base_delivered BIGINT NOT NULL,
    base_opened    BIGINT NOT NULL,
    delivered      BIGINT NOT NULL,
    opened         BIGINT NOT NULL,
    -- The slot's 30-day open rate in per mille; -1: too few deliveries.
    rate_permille  BIGINT NOT NULL,
    PRIMARY KEY (table_id, channel, hour)
);

-- NULL: accepted while no rate card was set (free).
ALTER TABLE messages ADD COLUMN price_table BIGINT;
-- The winning bid the message draws capacity from.
ALTER TABLE messages ADD COLUMN bid_id TEXT;

-- The billing ledger: append-only. Charges for deliveries and opens are
-- written by the rollup worker from deduplicated events (one line per
-- message, kind, channel, slot, carrier and local hour of the events);
-- awards when an auction closes.
CREATE TABLE ledger (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    enterprise_id TEXT NOT NULL,
    -- delivered, opened, award
    kind          TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    bid_id        TEXT NOT NULL,
    channel       BIGINT NOT NULL,
    -- The priced slot: local hour of the delivery (-1 for awards).
    slot          BIGINT NOT NULL,
    carrier_id    TEXT NOT NULL,
    quantity      BIGINT NOT NULL,
    unit_price    BIGINT NOT NULL,
    amount        BIGINT NOT NULL,
    -- When what is charged happened (the start of its local hour), which
    -- decides the statement period.
    at            BIGINT NOT NULL,
    recorded_at   BIGINT NOT NULL
);
CREATE INDEX ledger_by_enterprise ON ledger (enterprise_id, at);
CREATE INDEX ledger_by_time ON ledger (at);
CREATE INDEX ledger_by_message ON ledger (message_id);
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only';
END;
$$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- Scarce send capacity sold by sealed-bid auction.
CREATE TABLE auction_slots (
    id             TEXT PRIMARY KEY,
    channel        BIGINT NOT NULL,
    starts_at      BIGINT NOT NULL,
    ends_at        BIGINT NOT NULL,
    capacity       BIGINT NOT NULL,
    closes_at      BIGINT NOT NULL,
    -- Yen per message; 0: none.
    reserve        BIGINT NOT NULL,
    -- pay_as_bid or uniform
    rule           TEXT NOT NULL,
    -- 0 open for bids, 1 closed
    state          BIGINT NOT NULL,
    -- Bids placed so far: also the row every bid and the close lock, so no
    -- bid slips past the close.
    bids           BIGINT NOT NULL DEFAULT 0,
    awarded        BIGINT NOT NULL DEFAULT 0,
    -- After the close: the uniform price, or the lowest winning bid.
    clearing_price BIGINT,
    created_at     BIGINT NOT NULL
);
CREATE INDEX auction_slots_by_close ON auction_slots (state, closes_at);
CREATE INDEX auction_slots_by_time ON auction_slots (channel, starts_at);

CREATE TABLE bids (
    id            TEXT PRIMARY KEY,
    slot_id       TEXT NOT NULL REFERENCES auction_slots (id),
    enterprise_id TEXT NOT NULL,
    -- Order of placement in the slot: earlier bids win ties.
    seq           BIGINT NOT NULL,
    quantity      BIGINT NOT NULL,
    price         BIGINT NOT NULL,
    placed_at     BIGINT NOT NULL,
    -- 0 sealed, 1 won, 2 lost
    state         BIGINT NOT NULL DEFAULT 0,
    awarded       BIGINT NOT NULL DEFAULT 0,
    -- Yen per message the winner pays.
    pays          BIGINT NOT NULL DEFAULT 0,
    -- Recipients of messages sent with this bid so far.
    used          BIGINT NOT NULL DEFAULT 0,
    UNIQUE (slot_id, seq)
);
CREATE INDEX bids_by_enterprise ON bids (enterprise_id);
