-- Real channels (`carrier_svc::gateways`): a delivery handed to an SMSC over
-- SMPP or to a mail server over SMTP is `pushed` (1) until the network says
-- what became of it; the new state 7 of `batches.states` is `failed` (the
-- SMSC or the mail server refused it, or reported it undeliverable).

-- What each gateway answered for each part of a delivery: the id it gave
-- (normalised: lower case, no leading zeros, so an id answered in hex and
-- reported in decimal, or the other way round, is found either way — see
-- `gateways::id_forms`), and what it has reported since. A delivery of
-- several SMS parts is delivered once every part is. Kept in the same
-- transaction that marks the delivery pushed, so a receipt arriving after a
-- restart still finds its delivery.
CREATE TABLE gateway_parts (
    gateway      TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    delivery_id  BIGINT NOT NULL,
    part         BIGINT NOT NULL,
    parts        BIGINT NOT NULL,
    -- 0 submitted, 1 delivered, 2 failed (refused, undeliverable, bounced), 3 read.
    outcome      BIGINT NOT NULL DEFAULT 0,
    -- The network's own words for a failure (an SMPP status or receipt state,
    -- an SMTP reply): never personal data.
    error        TEXT NOT NULL DEFAULT '',
    submitted_at BIGINT NOT NULL,
    PRIMARY KEY (gateway, external_id)
);
-- Receipts and bounces find a delivery's parts by its (hub-wide unique) id.
CREATE INDEX gateway_parts_by_delivery ON gateway_parts (delivery_id, message_id);

-- Reports about ids not (yet) in `gateway_parts`: an SMSC may send a receipt
-- before its submit response has been recorded here. Applied as soon as the
-- id is recorded; kept a day otherwise.
CREATE TABLE gateway_orphans (
    gateway     TEXT NOT NULL,
    external_id TEXT NOT NULL,
    outcome     BIGINT NOT NULL,
    error       TEXT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (gateway, external_id, outcome)
);
