-- The W3C traceparent of the SendMessage call that accepted a message: its
-- expansion, hand-overs and receipts continue that trace. Empty: not traced.
ALTER TABLE messages ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
