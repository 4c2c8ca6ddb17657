-- Two lanes per carrier: targeted messages' deliveries (lane 0) are read
-- and handed over before campaigns' (lane 1), so a message to a few people
-- does not wait behind a broadcast's backlog. The partial index holds only
-- the priority lane's pending rows: usually none.
ALTER TABLE deliveries ADD COLUMN lane BIGINT NOT NULL DEFAULT 1;
CREATE INDEX deliveries_priority_due ON deliveries (carrier_id, id) WHERE state = 0 AND lane = 0;
