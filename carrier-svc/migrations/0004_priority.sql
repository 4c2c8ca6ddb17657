-- Targeted messages' deliveries go to terminals before the campaign
-- deliveries the carrier holds (the relay's priority lane, kept here). The
-- partial index holds only those still held, so reading them first costs
-- nothing while there are none.
ALTER TABLE deliveries ADD COLUMN priority BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX deliveries_priority_held ON deliveries (seq) WHERE state = 0 AND priority;
