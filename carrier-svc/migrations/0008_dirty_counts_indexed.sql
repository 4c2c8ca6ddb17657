-- The counts changed since the last report, found through an index of
-- their own: each report (every second) took them with
-- `UPDATE message_counts SET dirty = FALSE WHERE dirty`, a scan of every
-- message the carrier ever counted, under the write turn its batch
-- accepts take too. After 57k targeted messages it held the turn for
-- 20–30 ms a report. The index holds only the rows still to report.
CREATE INDEX message_counts_dirty ON message_counts (message_id) WHERE dirty;
