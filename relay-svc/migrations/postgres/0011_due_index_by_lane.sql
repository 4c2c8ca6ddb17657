-- A dispatcher reads each lane in id order: (carrier, state, lane, id) is
-- one index range per lane. Before, SQLite read the priority lane through
-- (carrier, state, id) and looked up every pending campaign row of the
-- carrier to find the few of lane 0 — ~100 ms per read with a million
-- pending, before every bulk batch (the partial index meant for it lost
-- to the longer key in the planner's choice).
DROP INDEX deliveries_priority_due;
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (carrier_id, state, lane, id);
