//! Rollups of the events (`stats_cells`, `stats_audience`, `person_*`) and
//! the reads behind `GetStats` and reconciliation. Hand-overs and receipts
//! only queue the keys of the events they really added ([`queue_roll_up!`],
//! one small insert in their transaction); [`Store::roll_up_queued`] folds
//! queued events into the rollups in large batches, called by the relay's
//! rollup worker. What the figures mean is `crate::stats`'s business; this
//! module only sums.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, QueryBuilder, Row};

use super::pricing::charge_events;
use super::{IdList, ROWS_PER_STATEMENT, Store, WritePool, on_pool};
use crate::error::Result;

/// Queues the events `$keys` — `(message_id, user_id, kind)` of events an
/// insert really added — for the rollups, inside the caller's transaction `$tx`.
macro_rules! queue_roll_up {
    ($tx:expr, $keys:expr) => {{
        let keys: &[(&str, &str, i64)] = $keys;
        for chunk in keys.chunks($crate::storage::ROWS_PER_STATEMENT) {
            let mut query =
                sqlx::QueryBuilder::new("INSERT INTO rollup_queue (message_id, user_id, kind) ");
            query.push_values(chunk, |mut row, (message_id, user_id, kind)| {
                row.push_bind(*message_id)
                    .push_bind(*user_id)
                    .push_bind(*kind);
            });
            query.build().execute(&mut *$tx).await?;
        }
    }};
}
pub(crate) use queue_roll_up;

/// The decade a profile `p`'s consented age range lies in (its start), or -1
/// when it was not shared that precisely.
pub(crate) const AGE_BAND: &str =
    "CASE WHEN p.age_min / 10 = p.age_max / 10 THEN p.age_min / 10 * 10 ELSE -1 END";

/// Per-person rows are kept only for people still in the hub (a contract)
/// or, per ref, still registered with the enterprise: events of a person
/// erased meanwhile still count in the cubes but rebuild no per-person row.
const IN_THE_HUB: &str = "EXISTS (SELECT 1 FROM contracts c WHERE c.user_id = e.user_id)";

/// What the fold needs of one queued event, read once: the event `e`, its
/// message `m`, the person's consented profile `p` for that enterprise, when
/// the person's first attempt was handed over (`h`), and whether the person
/// is still in the hub and still registered with the enterprise. Every
/// rollup is computed from these rows in memory, so each event is joined
/// once, not once per rollup.
#[derive(sqlx::FromRow)]
struct FoldRow {
    kind: i64,
    at: i64,
    channel: i64,
    carrier_id: String,
    /// Where the terminal was (deliveries and opens).
    place: String,
    user_id: String,
    enterprise_id: String,
    by_attributes: bool,
    handed_over_at: Option<i64>,
    gender: String,
    age_band: i64,
    region: String,
    occupation: String,
    in_hub: bool,
    registered: bool,
}

/// The select of [`FoldRow`]s, up to the queued keys' `VALUES`.
fn fold_select() -> String {
    format!(
        "SELECT e.kind, e.at, e.channel, e.carrier_id, e.region AS place, e.user_id,
                m.enterprise_id, m.by_attributes, h.at AS handed_over_at,
                COALESCE(p.gender, '') AS gender, {AGE_BAND} AS age_band,
                COALESCE(p.region, '') AS region, COALESCE(p.occupation, '') AS occupation,
                {IN_THE_HUB} AS in_hub,
                EXISTS (SELECT 1 FROM registrations r WHERE r.enterprise_id = m.enterprise_id AND r.user_id = e.user_id) AS registered
         FROM ("
    )
}

const FOLD_JOIN: &str = ") AS v JOIN events e ON e.message_id = v.column1 AND e.user_id = v.column2 AND e.kind = v.column3
    JOIN messages m ON m.id = e.message_id
    LEFT JOIN profiles p ON p.enterprise_id = m.enterprise_id AND p.user_id = e.user_id
    LEFT JOIN events h ON h.message_id = e.message_id AND h.user_id = e.user_id AND h.kind = 1
    WHERE e.kind IN (1, 2, 3)";

/// A key column's value in a rollup row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Text(String),
    Number(i64),
}

/// One rollup table's additions: key values → sent, delivered, opened. In
/// key order: concurrent folds (replicas on one PostgreSQL) take the rows'
/// locks in the same order, so they never deadlock.
#[derive(Debug, Default)]
struct Sums(std::collections::BTreeMap<Vec<Key>, [i64; 3]>);

impl Sums {
    fn add(&mut self, key: Vec<Key>, kind: i64) {
        if let Some(counter) = usize::try_from(kind - 1).ok().filter(|&i| i < 3) {
            self.0.entry(key).or_default()[counter] += 1;
        }
    }
}

/// The rollups' additions from folded events: `stats_cells` (enterprise,
/// hand-over hour, channel, carrier, place, open hour), `stats_audience`
/// (enterprise, hand-over day, channel, consented gender / age decade /
/// region / occupation), `person_channels` and `person_refs` (enterprise,
/// person, channel) and `person_hours` (opens by person and UTC hour); an
/// event counts as a send (handed over), a delivery or an open.
fn fold(rows: &[FoldRow]) -> [(&'static str, &'static [&'static str], Sums); 5] {
    let text = |value: &str| Key::Text(value.to_owned());
    let mut cells = Sums::default();
    let mut audience = Sums::default();
    let mut channels = Sums::default();
    let mut refs = Sums::default();
    let mut hours = Sums::default();
    for e in rows {
        let sent_at = e.handed_over_at.unwrap_or(e.at);
        cells.add(
            vec![
                text(&e.enterprise_id),
                Key::Number(sent_at / 3_600_000),
                Key::Number(e.channel),
                text(&e.carrier_id),
                text(if e.kind == 1 { "" } else { &e.place }),
                Key::Number(if e.kind == 3 { e.at / 3_600_000 } else { -1 }),
            ],
            e.kind,
        );
        audience.add(
            vec![
                text(&e.enterprise_id),
                Key::Number(sent_at / 86_400_000),
                Key::Number(e.channel),
                text(&e.gender),
                Key::Number(e.age_band),
                text(&e.region),
                text(&e.occupation),
            ],
            e.kind,
        );
        let person = || {
            vec![
                text(&e.enterprise_id),
                text(&e.user_id),
                Key::Number(e.channel),
            ]
        };
        if e.in_hub {
            channels.add(person(), e.kind);
        }
        // What an enterprise sees per ref: never messages that chose their
        // people by attributes, whose recipients would reveal those attributes.
        if !e.by_attributes && e.registered {
            refs.add(person(), e.kind);
        }
        if e.in_hub && e.kind == 3 {
            // Counted in the "opened" column (the table has no other).
            hours.add(
                vec![text(&e.user_id), Key::Number((e.at / 3_600_000) % 24)],
                3,
            );
        }
    }
    const CELLS: &[&str] = &[
        "enterprise_id",
        "send_hour",
        "channel",
        "carrier_id",
        "place",
        "open_hour",
    ];
    const AUDIENCE: &[&str] = &[
        "enterprise_id",
        "send_day",
        "channel",
        "gender",
        "age_band",
        "region",
        "occupation",
    ];
    const PERSON: &[&str] = &["enterprise_id", "user_id", "channel"];
    const HOURS: &[&str] = &["user_id", "hour"];
    [
        ("stats_cells", CELLS, cells),
        ("stats_audience", AUDIENCE, audience),
        ("person_channels", PERSON, channels),
        ("person_refs", PERSON, refs),
        ("person_hours", HOURS, hours),
    ]
}

/// Adds `sums` to `table` (keyed by `keys`): one multi-row upsert per chunk.
/// `person_hours` has only an `opened` counter.
macro_rules! upsert_sums {
    ($tx:expr, $table:expr, $keys:expr, $sums:expr) => {{
        let table: &str = $table;
        let keys: &[&str] = $keys;
        let counters: &[&str] = if table == "person_hours" {
            &["opened"]
        } else {
            &["sent", "delivered", "opened"]
        };
        let rows: Vec<(Vec<Key>, [i64; 3])> = $sums.0.into_iter().collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT / 2) {
            let mut query = QueryBuilder::new(format!(
                "INSERT INTO {table} ({}, {}) ",
                keys.join(", "),
                counters.join(", ")
            ));
            query.push_values(chunk, |mut row, (key, sums)| {
                for value in key {
                    match value {
                        Key::Text(text) => row.push_bind(text.clone()),
                        Key::Number(number) => row.push_bind(*number),
                    };
                }
                if counters.len() == 1 {
                    row.push_bind(sums[2]);
                } else {
                    for sum in sums {
                        row.push_bind(*sum);
                    }
                }
            });
            let updates: Vec<String> = counters
                .iter()
                .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
                .collect();
            query.push(format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                keys.join(", "),
                updates.join(", ")
            ));
            query.build().execute(&mut *$tx).await?;
        }
    }};
}

impl Store {
    /// Folds up to `limit` queued events into the rollups and charges the
    /// delivered and opened among them to the ledger, in one transaction
    /// (oldest first), at `now`; returns how many it folded.
    pub async fn roll_up_queued(&self, limit: u32, now: i64) -> Result<u64> {
        let delete = format!(
            "DELETE FROM rollup_queue WHERE {}",
            self.in_id_list("seq", 1)
        );
        // Claimed: two folds at once (two relays on one PostgreSQL database)
        // take different events, so nothing is folded or charged twice.
        let select = format!(
            "SELECT seq, message_id, user_id, kind FROM rollup_queue ORDER BY seq LIMIT $1{}",
            self.claim()
        );
        let fence = self.rollup_fence(false);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if let Some(fence) = fence {
                sqlx::query(fence).execute(&mut *tx).await?;
            }
            let queued: Vec<(i64, String, String, i64)> = sqlx::query_as(AssertSqlSafe(select))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            if queued.is_empty() {
                return Ok(0);
            }
            let mut rows: Vec<FoldRow> = Vec::with_capacity(queued.len());
            for chunk in queued.chunks(ROWS_PER_STATEMENT) {
                charge_events!(tx, chunk, now);
                let mut query = QueryBuilder::new(fold_select());
                query.push_values(chunk, |mut row, (_, message_id, user_id, kind)| {
                    row.push_bind(message_id).push_bind(user_id).push_bind(*kind);
                });
                query.push(FOLD_JOIN);
                rows.extend(query.build_query_as::<FoldRow>().fetch_all(&mut *tx).await?);
            }
            for (table, keys, sums) in fold(&rows) {
                upsert_sums!(tx, table, keys, sums);
            }
            // Where each person's terminal was last seen.
            let mut latest: HashMap<&str, (&str, i64)> = HashMap::new();
            for e in rows.iter().filter(|e| (e.kind == 2 || e.kind == 3) && !e.place.is_empty() && e.in_hub) {
                let entry = latest.entry(e.user_id.as_str()).or_insert((e.place.as_str(), e.at));
                if e.at >= entry.1 {
                    *entry = (e.place.as_str(), e.at);
                }
            }
            let mut latest: Vec<(&str, (&str, i64))> = latest.into_iter().collect();
            // In key order, like the rollups (no deadlock between folds).
            latest.sort_unstable();
            for chunk in latest.chunks(ROWS_PER_STATEMENT) {
                let mut upsert = QueryBuilder::new("INSERT INTO person_places (user_id, place, seen_at) ");
                upsert.push_values(chunk, |mut row, (user_id, (place, at))| {
                    row.push_bind(*user_id).push_bind(*place).push_bind(*at);
                });
                upsert.push(
                    " ON CONFLICT (user_id) DO UPDATE SET place = excluded.place, seen_at = excluded.seen_at
                      WHERE excluded.seen_at >= person_places.seen_at",
                );
                upsert.build().execute(&mut *tx).await?;
            }
            let seqs: Vec<i64> = queued.iter().map(|(seq, ..)| *seq).collect();
            sqlx::query(AssertSqlSafe(delete)).bind(IdList(&seqs)).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(queued.len() as u64)
        })
    }

    /// The newest queued event's sequence number (`None`: the queue is
    /// empty), which moves while events keep arriving.
    pub async fn roll_up_newest(&self) -> Result<Option<i64>> {
        let newest: Option<i64> = on_pool!(self, pool => sqlx::query_scalar("SELECT MAX(seq) FROM rollup_queue")
            .fetch_one(pool)
            .await)?;
        Ok(newest)
    }

    /// Events waiting to be folded into the rollups.
    pub async fn roll_up_backlog(&self) -> Result<u64> {
        let count: i64 = on_pool!(self, pool => sqlx::query_scalar("SELECT COUNT(*) FROM rollup_queue")
            .fetch_one(pool)
            .await)?;
        Ok(count.max(0) as u64)
    }
}

/// The two statistics cubes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cube {
    /// `stats_cells`: by hour of the send, channel, carrier, place, open hour.
    Time,
    /// `stats_audience`: by day of the send, channel and consented attributes.
    Audience,
}

impl Cube {
    fn table(self) -> &'static str {
        match self {
            Self::Time => "stats_cells",
            Self::Audience => "stats_audience",
        }
    }

    /// The column sends are filtered on: hours or days since the epoch.
    fn time_column(self) -> &'static str {
        match self {
            Self::Time => "send_hour",
            Self::Audience => "send_day",
        }
    }

    /// Milliseconds in one unit of the time column.
    pub fn time_unit_ms(self) -> i64 {
        match self {
            Self::Time => 3_600_000,
            Self::Audience => 86_400_000,
        }
    }

    fn columns(self) -> &'static [&'static str] {
        match self {
            Self::Time => &["send_hour", "channel", "carrier_id", "place", "open_hour"],
            Self::Audience => &[
                "send_day",
                "channel",
                "gender",
                "age_band",
                "region",
                "occupation",
            ],
        }
    }
}

/// One group of summed cells: the grouped columns' values (as text) and the sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummedCells {
    pub values: Vec<String>,
    pub sent: u64,
    pub delivered: u64,
    pub opened: u64,
}

/// Per carrier and message: the events attributed to the carrier beside its
/// own latest report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciliation {
    pub carrier_id: String,
    pub message_id: String,
    pub counted_delivered: u64,
    pub counted_opened: u64,
    pub reported_sent: u64,
    pub reported_opened: u64,
    /// When the carrier last reported on the message (0: never).
    pub reported_at: i64,
    /// Delivered over every carrier of a person: a person reached by two
    /// carriers is counted at the first to report them.
    pub all_carriers: bool,
}

impl Store {
    /// A cube (`stats_cells` by hour or `stats_audience` by day) summed by
    /// `columns` for sends in time buckets `[since, until)` of its
    /// `time_column`, for one enterprise or the whole hub. A time column's
    /// values come back as hours since the epoch.
    pub async fn sum_cells(
        &self,
        cube: Cube,
        enterprise_id: Option<&str>,
        columns: &[&str],
        since: i64,
        until: i64,
    ) -> Result<Vec<SummedCells>> {
        debug_assert!(columns.iter().all(|c| cube.columns().contains(c)));
        // Time comes back in hours since the epoch from either cube (a day
        // as the hour it starts), so callers read one unit.
        let select: Vec<String> = columns
            .iter()
            .map(|c| match *c {
                "send_day" => "CAST(send_day * 24 AS TEXT)".to_owned(),
                c => format!("CAST({c} AS TEXT)"),
            })
            .collect();
        let group = if columns.is_empty() {
            String::new()
        } else {
            format!("GROUP BY {}", columns.join(", "))
        };
        let (table, time) = (cube.table(), cube.time_column());
        let sql = format!(
            "SELECT {}CAST(COALESCE(SUM(sent), 0) AS BIGINT), CAST(COALESCE(SUM(delivered), 0) AS BIGINT),
                    CAST(COALESCE(SUM(opened), 0) AS BIGINT)
             FROM {table}
             WHERE ($1 = '' OR enterprise_id = $1) AND {time} >= $2 AND {time} < $3 {group}",
            select.iter().map(|s| format!("{s}, ")).collect::<String>(),
        );
        self.fetch_summed(sql, enterprise_id, &[since, until], columns.len())
            .await
    }

    /// `person_channels` summed per person (the enterprise's ref, or the
    /// hub's user id for the whole hub), and per channel when `by_channel`.
    pub async fn sum_people(
        &self,
        enterprise_id: Option<&str>,
        by_channel: bool,
    ) -> Result<Vec<SummedCells>> {
        let (person, join) = match enterprise_id {
            Some(_) => (
                "r.user_ref",
                "JOIN registrations r ON r.enterprise_id = c.enterprise_id AND r.user_id = c.user_id",
            ),
            None => ("c.user_id", ""),
        };
        let (select, group, width) = if by_channel {
            (
                format!("{person}, CAST(c.channel AS TEXT)"),
                format!("{person}, c.channel"),
                2,
            )
        } else {
            (person.to_owned(), person.to_owned(), 1)
        };
        // The operator sees every message; an enterprise only those that did
        // not choose their people by attributes.
        let table = match enterprise_id {
            Some(_) => "person_refs",
            None => "person_channels",
        };
        let sql = format!(
            "SELECT {select}, CAST(SUM(c.sent) AS BIGINT), CAST(SUM(c.delivered) AS BIGINT), CAST(SUM(c.opened) AS BIGINT)
             FROM {table} c {join}
             WHERE ($1 = '' OR c.enterprise_id = $1) GROUP BY {group}"
        );
        self.fetch_summed(sql, enterprise_id, &[], width).await
    }

    /// Runs a summing query whose `$1` is the enterprise (`''`: the whole
    /// hub) and `$2…` are `bounds`; reads `width` text columns and the sums.
    async fn fetch_summed(
        &self,
        sql: String,
        enterprise_id: Option<&str>,
        bounds: &[i64],
        width: usize,
    ) -> Result<Vec<SummedCells>> {
        on_pool!(self, pool => {
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(enterprise_id.unwrap_or(""));
            for bound in bounds {
                query = query.bind(*bound);
            }
            let rows = query.fetch_all(pool).await?;
            rows.iter().map(|row| summed(row, width)).collect::<Result<Vec<_>, sqlx::Error>>()
        })
        .map_err(Into::into)
    }

    /// Carriers' reports against the events attributed to them, per carrier
    /// and message (one message, or all); only pairs that differ unless `all`.
    pub async fn reconcile(
        &self,
        message_id: Option<&str>,
        all: bool,
    ) -> Result<Vec<Reconciliation>> {
        type Row = (String, String, i64, i64, i64, i64, i64, bool);
        let rows: Vec<Row> = on_pool!(self, pool => sqlx::query_as(
            "SELECT x.carrier_id, x.message_id,
                    CAST(SUM(x.delivered) AS BIGINT), CAST(SUM(x.opened) AS BIGINT),
                    CAST(SUM(x.reported_sent) AS BIGINT), CAST(SUM(x.reported_opened) AS BIGINT),
                    CAST(MAX(x.reported_at) AS BIGINT), m.all_carriers
             FROM (
                 SELECT carrier_id, message_id,
                        COUNT(*) FILTER (WHERE kind = 2) AS delivered, COUNT(*) FILTER (WHERE kind = 3) AS opened,
                        0 AS reported_sent, 0 AS reported_opened, 0 AS reported_at
                 FROM events WHERE kind IN (2, 3) AND ($1 = '' OR message_id = $1) GROUP BY carrier_id, message_id
                 UNION ALL
                 SELECT carrier_id, message_id, 0, 0, sent, opened, reported_at
                 FROM count_reports WHERE ($1 = '' OR message_id = $1)
             ) AS x JOIN messages m ON m.id = x.message_id
             GROUP BY x.carrier_id, x.message_id, m.all_carriers
             HAVING $2 OR SUM(x.delivered) <> SUM(x.reported_sent) OR SUM(x.opened) <> SUM(x.reported_opened)
             ORDER BY x.message_id, x.carrier_id",
        )
        .bind(message_id.unwrap_or(""))
        .bind(all)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    carrier_id,
                    message_id,
                    delivered,
                    opened,
                    sent,
                    reported_opened,
                    at,
                    all_carriers,
                )| {
                    Reconciliation {
                        carrier_id,
                        message_id,
                        counted_delivered: delivered as u64,
                        counted_opened: opened as u64,
                        reported_sent: sent as u64,
                        reported_opened: reported_opened as u64,
                        reported_at: at,
                        all_carriers,
                    }
                },
            )
            .collect())
    }
}

/// A summed row: `width` text columns, then sent, delivered, opened.
fn summed<R: Row>(row: &R, width: usize) -> Result<SummedCells, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let values = (0..width)
        .map(|i| row.try_get::<String, _>(i))
        .collect::<Result<Vec<_>, _>>()?;
    let count = |i: usize| row.try_get::<i64, _>(i).map(|n| n.max(0) as u64);
    Ok(SummedCells {
        values,
        sent: count(width)?,
        delivered: count(width + 1)?,
        opened: count(width + 2)?,
    })
}
