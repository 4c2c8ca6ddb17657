-- W3C traceparents: of the relay's hand-over on each delivery (the push to the
-- terminal continues it), and of the terminal's event on each receipt (the
-- relay's receipt continues it). Empty: not traced.
ALTER TABLE deliveries ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
