-- Every event the log adds is counted by the database in the statement that
-- adds it, whatever the statement: a hand-over or a batch of receipts need
-- not bring back a row per person to count them (each crossed sqlx's
-- worker hand-off), and no writer of events can forget the count. Deferrals
-- (kind 8) are not events; their writer still adds them itself.
CREATE TRIGGER events_counted AFTER INSERT ON events
BEGIN
    INSERT INTO message_counts (message_id, kind, count) VALUES (NEW.message_id, NEW.kind, 1)
    ON CONFLICT (message_id, kind) DO UPDATE SET count = count + 1;
END;
