-- A message's own events go into the events log beside its people's, so a
-- webhook endpoint gets them in commit order with the rest: the person
-- is '' and the kind one of 11 accepted, 12 expanded, 13 handed over (all
-- matched people), 14 completed (closed at its expiry). `detail` holds
-- the message's counts when it happened, as JSON, so a retried webhook
-- batch carries the same counts. Person events leave it NULL.
ALTER TABLE events ADD COLUMN detail TEXT;
