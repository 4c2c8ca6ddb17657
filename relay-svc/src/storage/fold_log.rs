//! The events log as the rollup fold reads it: where each backend's log
//! stands (`EventLog`), and the fold's working set (`fold_rows`), filled
//! from the events past the cursor with what each rollup needs of the
//! message, the person's consented profile and their place in the hub.

use sqlx::AssertSqlSafe;

use super::Store;

/// The decade a profile `p`'s consented age range lies in (its start), or -1
/// when it was not shared that precisely.
pub(crate) const AGE_BAND: &str =
    "CASE WHEN p.age_min / 10 = p.age_max / 10 THEN p.age_min / 10 * 10 ELSE -1 END";

/// Per-person rows are kept only for people still in the hub (a contract)
/// or, per ref, still registered with the enterprise: events of a person
/// erased meanwhile still count in the cubes but rebuild no per-person row.
/// Probes, not `EXISTS` (see the `storage` module).
const IN_THE_HUB: &str =
    "(SELECT 1 FROM contracts c WHERE c.user_id = e.user_id LIMIT 1) IS NOT NULL";
const REGISTERED: &str = "(SELECT 1 FROM registrations r
                           WHERE r.enterprise_id = m.enterprise_id AND r.user_id = e.user_id LIMIT 1) IS NOT NULL";

/// The fold's working set, one row per event read past the cursor: the
/// event, its message's enterprise, the person's consented profile for it,
/// when the person's first attempt was handed over (`sent_at`: a hand-over
/// event's own time; only later events look theirs up), and whether
/// the person is still in the hub and registered with the enterprise. A
/// temporary table of each connection (`Store::connect` creates it), filled
/// by one joined `INSERT … SELECT` per fold, so each event is joined once
/// and no row of it travels through the driver: every rollup below is a
/// `GROUP BY` over it inside the database. On PostgreSQL its rows go at
/// commit (`on_commit`: " ON COMMIT DELETE ROWS"); on SQLite the fold
/// empties it first. `(tx, seq)` is the event's place in the log.
pub(crate) fn create_fold_rows(on_commit: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!(
        "CREATE TEMPORARY TABLE fold_rows (
            tx BIGINT NOT NULL, seq BIGINT NOT NULL, kind BIGINT, at BIGINT, channel BIGINT, carrier_id TEXT, place TEXT,
            user_id TEXT, message_id TEXT, enterprise_id TEXT, by_attributes BOOLEAN, sent_at BIGINT,
            gender TEXT, age_band BIGINT, region TEXT, occupation TEXT, in_hub BOOLEAN, registered BOOLEAN)
         {on_commit}"
    ))
}

/// How a backend reads the events log past the fold's cursor.
pub(crate) struct EventLog {
    /// The event's writing transaction as a number (`e.` is the event).
    pub tx: &'static str,
    /// The condition for an event past the cursor `($2, $3)`.
    pub past: &'static str,
    /// The condition for an event the fold may read now.
    pub ready: &'static str,
    /// The condition for an event at or before `($4, $5)`.
    pub upto: &'static str,
    /// The log's order.
    pub order: &'static str,
    /// The same order, newest first.
    pub newest_first: &'static str,
}

/// SQLite has one writer: sequence numbers are taken in commit order.
pub(crate) const SQLITE_LOG: EventLog = EventLog {
    tx: "0",
    past: "e.seq > $3",
    ready: "TRUE",
    upto: "e.seq <= $5",
    order: "e.seq",
    newest_first: "e.seq DESC",
};

/// PostgreSQL: only events of transactions older than every running one,
/// in (transaction, sequence) order — see migration 0012.
pub(crate) const POSTGRES_LOG: EventLog = EventLog {
    tx: "CAST(CAST(e.tx AS TEXT) AS BIGINT)",
    past: "(e.tx, e.seq) > (CAST(CAST($2 AS TEXT) AS xid8), $3)",
    ready: "e.tx < pg_snapshot_xmin(pg_current_snapshot())",
    upto: "(e.tx, e.seq) <= (CAST(CAST($4 AS TEXT) AS xid8), $5)",
    order: "e.tx, e.seq",
    newest_first: "e.tx DESC, e.seq DESC",
};

/// Fills `fold_rows` from the oldest events past the cursor (`$1`: how
/// many; `($2, $3)`: the cursor), in `store`'s SQL.
pub(super) fn fill_fold_rows(store: &Store) -> String {
    let log = store.event_log();
    let profile = store.left_join_by_row(
        "profiles",
        "p",
        "p.enterprise_id = m.enterprise_id AND p.user_id = e.user_id",
    );
    format!(
        "INSERT INTO fold_rows
         SELECT e.tx, e.seq, e.kind, e.at, e.channel, e.carrier_id, e.region, e.user_id, e.message_id,
                m.enterprise_id, m.by_attributes,
                CASE WHEN e.kind = 1 THEN e.at
                     ELSE COALESCE((SELECT h.at FROM events h
                                    WHERE h.message_id = e.message_id AND h.user_id = e.user_id AND h.kind = 1), e.at) END,
                COALESCE(p.gender, ''), {AGE_BAND}, COALESCE(p.region, ''), COALESCE(p.occupation, ''),
                {IN_THE_HUB}, {REGISTERED}
         FROM (SELECT {tx} AS tx, e.seq, e.kind, e.at, e.channel, e.carrier_id, e.region, e.user_id, e.message_id
               FROM events e WHERE {past} AND {ready} ORDER BY {order} LIMIT $1) AS e
         LEFT JOIN messages m ON m.id = e.message_id
         {profile}",
        tx = log.tx,
        past = log.past,
        ready = log.ready,
        order = log.order,
    )
}
