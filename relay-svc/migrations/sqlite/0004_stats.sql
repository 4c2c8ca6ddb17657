-- Aggregates of the events, grown in the transaction that adds the events
-- (storage/stats.rs), so statistics never scan the events.
--
-- A cell counts sends (hand-overs), deliveries and opens of one enterprise's
-- messages that share every dimension. Hours are hours since the epoch (UTC),
-- so any time zone can be applied when reading. The person's attributes are
-- the ones they had consented to when the event happened ('' / -1: not shared).
CREATE TABLE stats_cells (
    enterprise_id TEXT NOT NULL,
    -- The hour the person's first attempt was handed to the carrier.
    send_hour     BIGINT NOT NULL,
    channel       BIGINT NOT NULL,
    carrier_id    TEXT NOT NULL,
    -- Where the terminal was when the message reached it (deliveries) or was
    -- opened (opens); '' for sends.
    place         TEXT NOT NULL,
    -- The hour of the open; -1 for sends and deliveries.
    open_hour     BIGINT NOT NULL,
    gender        TEXT NOT NULL,
    -- The start of the consented age decade; -1 when not shared at that precision.
    age_band      BIGINT NOT NULL,
    region        TEXT NOT NULL,
    occupation    TEXT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, send_hour, channel, carrier_id, place, open_hour,
                 gender, age_band, region, occupation)
);

-- Per enterprise, person and channel: the per-ref breakdown, and the evidence
-- the channel choices read (a person's history across enterprises by user_id).
CREATE TABLE person_channels (
    enterprise_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    channel       BIGINT NOT NULL,
    sent          BIGINT NOT NULL,
    delivered     BIGINT NOT NULL,
    opened        BIGINT NOT NULL,
    PRIMARY KEY (enterprise_id, user_id, channel)
);
CREATE INDEX person_channels_by_user ON person_channels (user_id, channel);

-- Per person, hub-wide: opens by hour of day (UTC), for sending at the
-- hour a person reads; and where their terminal was last seen, for place and
-- hour targeting.
CREATE TABLE person_hours (
    user_id TEXT NOT NULL,
    hour    BIGINT NOT NULL,
    opened  BIGINT NOT NULL,
    PRIMARY KEY (user_id, hour)
);
CREATE TABLE person_places (
    user_id TEXT PRIMARY KEY,
    place   TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);

-- A per-person send time (policy::SendTime, encoded); NULL: none.
ALTER TABLE messages ADD COLUMN send_time TEXT;

-- The events so far, rolled up the way storage/stats.rs rolls up new ones.
INSERT INTO stats_cells
SELECT m.enterprise_id,
       COALESCE(h.at, e.at) / 3600000,
       e.channel,
       e.carrier_id,
       CASE WHEN e.kind = 1 THEN '' ELSE e.region END,
       CASE WHEN e.kind = 3 THEN e.at / 3600000 ELSE -1 END,
       COALESCE(p.gender, ''),
       CASE WHEN p.age_min / 10 = p.age_max / 10 THEN p.age_min / 10 * 10 ELSE -1 END,
       COALESCE(p.region, ''),
       COALESCE(p.occupation, ''),
       CAST(SUM(CASE WHEN e.kind = 1 THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN e.kind = 2 THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN e.kind = 3 THEN 1 ELSE 0 END) AS BIGINT)
FROM events e
JOIN messages m ON m.id = e.message_id
LEFT JOIN profiles p ON p.enterprise_id = m.enterprise_id AND p.user_id = e.user_id
LEFT JOIN events h ON h.message_id = e.message_id AND h.user_id = e.user_id AND h.kind = 1
WHERE e.kind IN (1, 2, 3)
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;

INSERT INTO person_channels
SELECT m.enterprise_id, e.user_id, e.channel,
       CAST(SUM(CASE WHEN e.kind = 1 THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN e.kind = 2 THEN 1 ELSE 0 END) AS BIGINT),
       CAST(SUM(CASE WHEN e.kind = 3 THEN 1 ELSE 0 END) AS BIGINT)
FROM events e
JOIN messages m ON m.id = e.message_id
WHERE e.kind IN (1, 2, 3)
GROUP BY 1, 2, 3;

INSERT INTO person_hours
SELECT user_id, (at / 3600000) % 24, COUNT(*) FROM events WHERE kind = 3 GROUP BY 1, 2;

INSERT INTO person_places
SELECT e.user_id, MIN(e.region), MAX(e.at)
FROM events e
WHERE e.kind IN (2, 3) AND e.region <> ''
  AND e.at = (SELECT MAX(l.at) FROM events l WHERE l.user_id = e.user_id AND l.kind IN (2, 3) AND l.region <> '')
GROUP BY e.user_id;

-- Opens per person and channel now live in person_channels.
DROP TABLE channel_opens;
