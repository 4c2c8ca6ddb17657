//! Rollups of the events (`stats_cells`, `stats_audience`, `person_*`) and
//! the reads behind `GetStats` and reconciliation. The events are the fold's
//! log: hand-overs and receipts only add events, and [`Store::roll_up_queued`]
//! folds those past the fold's cursor (`rollup_cursor`) into the rollups in
//! large batches, called by the relay's rollup worker. What the figures mean
//! is `crate::stats`'s business; this module only sums.

use sqlx::{AssertSqlSafe, Row};

use super::fold_log::fill_fold_rows;
use super::pricing::ChargeSteps;
use super::{Store, WritePool, on_pool, on_write};
use crate::error::Result;

/// One rollup table and how the fold's rows (`fold_rows`) add to it.
struct Rollup {
    table: &'static str,
    /// Its key columns, each with the expression over `fold_rows` that fills it.
    key: &'static [(&'static str, &'static str)],
    /// Its counters, each with the event kind it counts (1 handed over = a
    /// send, 2 delivered, 3 opened).
    counts: &'static [(&'static str, i64)],
    /// Which of the fold's rows count (SQL over `fold_rows`).
    only: &'static str,
}

const SENT: (&str, i64) = ("sent", 1);
const DELIVERED: (&str, i64) = ("delivered", 2);
const OPENED: (&str, i64) = ("opened", 3);

/// The rollups: `stats_cells` (enterprise, hand-over hour, channel,
/// carrier, place, open hour), `stats_audience` (enterprise, hand-over day,
/// channel, consented gender / age decade / region / occupation),
/// `person_channels` and `person_refs` (enterprise, person, channel) and
/// `person_hours` (opens by person and UTC hour).
const ROLLUPS: [Rollup; 5] = [
    Rollup {
        table: "stats_cells",
        key: &[
            ("enterprise_id", "enterprise_id"),
            ("send_hour", "sent_at / 3600000"),
            ("channel", "channel"),
            ("carrier_id", "carrier_id"),
            ("place", "CASE WHEN kind = 1 THEN '' ELSE place END"),
            (
                "open_hour",
                "CASE WHEN kind = 3 THEN at / 3600000 ELSE -1 END",
            ),
        ],
        counts: &[SENT, DELIVERED, OPENED],
        only: "TRUE",
    },
    Rollup {
        table: "stats_audience",
        key: &[
            ("enterprise_id", "enterprise_id"),
            ("send_day", "sent_at / 86400000"),
            ("channel", "channel"),
            ("gender", "gender"),
            ("age_band", "age_band"),
            ("region", "region"),
            ("occupation", "occupation"),
        ],
        counts: &[SENT, DELIVERED, OPENED],
        only: "TRUE",
    },
    Rollup {
        table: "person_channels",
        key: &[
            ("enterprise_id", "enterprise_id"),
            ("user_id", "user_id"),
            ("channel", "channel"),
        ],
        counts: &[SENT, DELIVERED, OPENED],
        only: "in_hub",
    },
    // What an enterprise sees per ref: never messages that chose their
    // people by attributes, whose recipients would reveal those attributes.
    Rollup {
        table: "person_refs",
        key: &[
            ("enterprise_id", "enterprise_id"),
            ("user_id", "user_id"),
            ("channel", "channel"),
        ],
        counts: &[SENT, DELIVERED, OPENED],
        only: "NOT by_attributes AND registered",
    },
    Rollup {
        table: "person_hours",
        key: &[("user_id", "user_id"), ("hour", "(at / 3600000) % 24")],
        counts: &[OPENED],
        only: "in_hub",
    },
];

impl Rollup {
    /// One upsert adding the fold's rows to the table, grouped by its key
    /// and in key order: concurrent folds (replicas on one PostgreSQL) take
    /// the rows' locks in the same order, so they never deadlock.
    fn upsert(&self) -> String {
        let columns: Vec<&str> = self.key.iter().map(|(column, _)| *column).collect();
        let columns = columns.join(", ");
        let keys: Vec<&str> = self.key.iter().map(|(_, expression)| *expression).collect();
        let keys = keys.join(", ");
        let counters: Vec<&str> = self.counts.iter().map(|(column, _)| *column).collect();
        let sums: Vec<String> = self
            .counts
            .iter()
            .map(|(_, kind)| format!("COUNT(*) FILTER (WHERE kind = {kind})"))
            .collect();
        let updates: Vec<String> = counters
            .iter()
            .map(|c| format!("{c} = {table}.{c} + excluded.{c}", table = self.table))
            .collect();
        let kinds: Vec<String> = self
            .counts
            .iter()
            .map(|(_, kind)| kind.to_string())
            .collect();
        let positions: Vec<String> = (1..=self.key.len()).map(|i| i.to_string()).collect();
        let positions = positions.join(", ");
        format!(
            "INSERT INTO {table} ({columns}, {counters})
             SELECT {keys}, {sums} FROM fold_rows
             WHERE kind IN ({kinds}) AND {only}
             GROUP BY {positions} ORDER BY {positions}
             ON CONFLICT ({columns}) DO UPDATE SET {updates}",
            table = self.table,
            counters = counters.join(", "),
            sums = sums.join(", "),
            kinds = kinds.join(", "),
            only = self.only,
            updates = updates.join(", "),
        )
    }
}

/// Where each person's terminal was last seen, from the fold's deliveries
/// and opens (the latest; of two at one instant, the later in the log).
const LAST_SEEN: &str = "INSERT INTO person_places (user_id, place, seen_at)
    SELECT user_id, place, at FROM (
        SELECT user_id, place, at, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY at DESC, tx DESC, seq DESC) AS latest
        FROM fold_rows WHERE kind IN (2, 3) AND place <> '' AND in_hub) AS f
    WHERE latest = 1 ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET place = excluded.place, seen_at = excluded.seen_at
    WHERE excluded.seen_at >= person_places.seen_at";

impl Store {
    /// Folds up to `limit` events past the fold's cursor into the rollups
    /// and charges the delivered and opened among them to the ledger, in one
    /// transaction (oldest first) that moves the cursor past them, at `now`;
    /// returns how many it folded.
    pub async fn roll_up_queued(&self, limit: u32, now: i64) -> Result<u64> {
        // Two folds at once (two relays on one PostgreSQL database) take
        // turns on the cursor's row, so nothing is folded or charged twice.
        let fill = fill_fold_rows(self);
        let fence = self.rollup_fence(false);
        let cursor = format!("SELECT tx, seq FROM rollup_cursor{}", self.lock_row());
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if let Some(fence) = fence {
                sqlx::query(fence).execute(&mut *tx).await?;
            }
            let (at_tx, at_seq): (i64, i64) =
                sqlx::query_as(AssertSqlSafe(cursor)).fetch_one(&mut *tx).await?;
            sqlx::query("DELETE FROM fold_rows").execute(&mut *tx).await?;
            let read = sqlx::query(AssertSqlSafe(fill))
                .bind(i64::from(limit))
                .bind(at_tx)
                .bind(at_seq)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if read == 0 {
                // Ended before the write turn passes on.
                tx.rollback().await?;
                return Ok(0);
            }
            tx.charge_events(now).await?;
            for rollup in &ROLLUPS {
                sqlx::query(AssertSqlSafe(rollup.upsert())).execute(&mut *tx).await?;
            }
            sqlx::query(LAST_SEEN).execute(&mut *tx).await?;
            sqlx::query(
                "UPDATE rollup_cursor SET tx = l.tx, seq = l.seq
                 FROM (SELECT tx, seq FROM fold_rows ORDER BY tx DESC, seq DESC LIMIT 1) AS l",
            )
            .execute(&mut *tx)
            .await?;
            chukei_proto::crash::point(chukei_proto::crash::RELAY_FOLD_UNCOMMITTED);
            tx.commit().await?;
            Ok(read)
        })
    }

    /// Folds every event committed before the call, in batches of `batch`:
    /// for checks and benchmarks, which need the figures final. On
    /// PostgreSQL the fold does not read past a transaction still running
    /// anywhere on the server (see [`POSTGRES_LOG`](super::fold_log::POSTGRES_LOG)), so this waits those
    /// out, for a minute at most. Returns how many it folded.
    pub async fn roll_up_all(&self, batch: u32, now: i64) -> Result<u64> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut folded = 0;
        loop {
            let read = self.roll_up_queued(batch, now).await?;
            folded += read;
            if read == 0 {
                if self.roll_up_backlog().await? == 0 || std::time::Instant::now() > deadline {
                    return Ok(folded);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }

    /// Where the fold stands: `(tx, seq)` of the last event it folded.
    async fn fold_cursor(&self) -> Result<(i64, i64)> {
        let cursor: (i64, i64) = on_pool!(self, pool => sqlx::query_as("SELECT tx, seq FROM rollup_cursor")
            .fetch_one(pool)
            .await)?;
        Ok(cursor)
    }

    /// The newest event the fold may read now (`None`: none), which moves
    /// while events keep arriving. One index probe, from the newest end.
    pub async fn roll_up_newest(&self) -> Result<Option<i64>> {
        let log = self.event_log();
        let newest = format!(
            "SELECT e.seq FROM events e WHERE {} AND {} ORDER BY {} LIMIT 1",
            log.past, log.ready, log.newest_first
        );
        let (tx, seq) = self.fold_cursor().await?;
        let newest: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(AssertSqlSafe(newest))
            .bind(0_i64)
            .bind(tx)
            .bind(seq)
            .fetch_optional(pool)
            .await)?;
        Ok(newest)
    }

    /// Events waiting to be folded into the rollups (on PostgreSQL with
    /// those of transactions the fold still waits for).
    pub async fn roll_up_backlog(&self) -> Result<u64> {
        let log = self.event_log();
        // Past the cursor, whether or not the fold may read them yet.
        let backlog = format!("SELECT COUNT(*) FROM events e WHERE {}", log.past);
        let (tx, seq) = self.fold_cursor().await?;
        let count: i64 = on_pool!(self, pool => sqlx::query_scalar(AssertSqlSafe(backlog))
            .bind(0_i64)
            .bind(tx)
            .bind(seq)
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
