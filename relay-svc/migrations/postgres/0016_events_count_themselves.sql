-- Every event the log adds is counted by the database in the statement that
-- adds it, whatever the statement: a hand-over or a batch of receipts need
-- not bring back a row per person to count them, and no writer of events
-- can forget the count. Once per statement, over the rows it really
-- inserted (a conflict skipped by ON CONFLICT DO NOTHING is not among
-- them), in key order so concurrent writers take the counts' row locks in
-- the same order. Deferrals (kind 8) are not events; their writer still
-- adds them itself.
CREATE FUNCTION events_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts (message_id, kind, count)
    SELECT message_id, kind, COUNT(*) FROM added GROUP BY message_id, kind ORDER BY message_id, kind
    ON CONFLICT (message_id, kind) DO UPDATE SET count = message_counts.count + excluded.count;
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_counted AFTER INSERT ON events
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION events_counted();
