//! Rollups of the events (`stats_cells`, `person_channels`), grown in the
//! transaction that adds the events, and the reads behind `GetStats` and
//! reconciliation. What the figures mean is `crate::stats`'s business; this
//! module only sums.

use sqlx::{AssertSqlSafe, Row};

use super::{Store, on_pool};
use crate::error::Result;

/// The `stats_cells` dimensions, as their columns.
pub(crate) const CELL_COLUMNS: [&str; 10] = [
    "enterprise_id",
    "send_hour",
    "channel",
    "carrier_id",
    "place",
    "open_hour",
    "gender",
    "age_band",
    "region",
    "occupation",
];

/// Grows `stats_cells`, `person_channels` and `person_hours` by the events `$keys` —
/// `(message_id, user_id, kind)` of events an insert really added — inside
/// the caller's transaction `$tx`. The same projection as the backfill in
/// migration 0004: the send hour is the person's hand-over, the attributes
/// are their consented profile now, sends have no place.
macro_rules! roll_up {
    ($tx:expr, $keys:expr) => {{
        let keys: &[(&str, &str, i64)] = $keys;
        for chunk in keys.chunks($crate::storage::ROWS_PER_STATEMENT) {
            let values = |query: &mut sqlx::QueryBuilder<_>| {
                query.push(" FROM (");
                query.push_values(chunk, |mut row, (message_id, user_id, kind)| {
                    row.push_bind(*message_id).push_bind(*user_id).push_bind(*kind);
                });
                query.push(
                    ") AS v JOIN events e ON e.message_id = v.column1 AND e.user_id = v.column2 AND e.kind = v.column3
                     JOIN messages m ON m.id = e.message_id",
                );
            };
            let mut cells = sqlx::QueryBuilder::new(
                "INSERT INTO stats_cells (enterprise_id, send_hour, channel, carrier_id, place, open_hour,
                                          gender, age_band, region, occupation, sent, delivered, opened)
                 SELECT m.enterprise_id, COALESCE(h.at, e.at) / 3600000, e.channel, e.carrier_id,
                        CASE WHEN e.kind = 1 THEN '' ELSE e.region END,
                        CASE WHEN e.kind = 3 THEN e.at / 3600000 ELSE -1 END,
                        COALESCE(p.gender, ''),
                        CASE WHEN p.age_min / 10 = p.age_max / 10 THEN p.age_min / 10 * 10 ELSE -1 END,
                        COALESCE(p.region, ''), COALESCE(p.occupation, ''), ",
            );
            cells.push($crate::storage::stats::SUM_BY_KIND);
            values(&mut cells);
            cells.push(
                " LEFT JOIN profiles p ON p.enterprise_id = m.enterprise_id AND p.user_id = e.user_id
                  LEFT JOIN events h ON h.message_id = e.message_id AND h.user_id = e.user_id AND h.kind = 1
                  WHERE e.kind IN (1, 2, 3)
                  GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
                  ON CONFLICT (enterprise_id, send_hour, channel, carrier_id, place, open_hour,
                               gender, age_band, region, occupation)
                  DO UPDATE SET sent = stats_cells.sent + excluded.sent,
                                delivered = stats_cells.delivered + excluded.delivered,
                                opened = stats_cells.opened + excluded.opened",
            );
            cells.build().execute(&mut *$tx).await?;

            let mut people = sqlx::QueryBuilder::new(
                "INSERT INTO person_channels (enterprise_id, user_id, channel, sent, delivered, opened)
                 SELECT m.enterprise_id, e.user_id, e.channel, ",
            );
            people.push($crate::storage::stats::SUM_BY_KIND);
            values(&mut people);
            people.push(
                " WHERE e.kind IN (1, 2, 3) GROUP BY 1, 2, 3
                  ON CONFLICT (enterprise_id, user_id, channel)
                  DO UPDATE SET sent = person_channels.sent + excluded.sent,
                                delivered = person_channels.delivered + excluded.delivered,
                                opened = person_channels.opened + excluded.opened",
            );
            people.build().execute(&mut *$tx).await?;

            let mut hours = sqlx::QueryBuilder::new(
                "INSERT INTO person_hours (user_id, hour, opened) SELECT e.user_id, (e.at / 3600000) % 24, COUNT(*)",
            );
            values(&mut hours);
            hours.push(
                " WHERE e.kind = 3 GROUP BY 1, 2
                  ON CONFLICT (user_id, hour) DO UPDATE SET opened = person_hours.opened + excluded.opened",
            );
            hours.build().execute(&mut *$tx).await?;
        }
    }};
}
pub(crate) use roll_up;

/// Sends, deliveries and opens among the grouped events `e`.
pub(crate) const SUM_BY_KIND: &str = "CAST(SUM(CASE WHEN e.kind = 1 THEN 1 ELSE 0 END) AS BIGINT),
     CAST(SUM(CASE WHEN e.kind = 2 THEN 1 ELSE 0 END) AS BIGINT),
     CAST(SUM(CASE WHEN e.kind = 3 THEN 1 ELSE 0 END) AS BIGINT)";

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
    /// `stats_cells` summed by `columns` (from [`CELL_COLUMNS`]) for sends in
    /// hours `[since_hour, until_hour)`, for one enterprise or the whole hub.
    pub async fn sum_cells(
        &self,
        enterprise_id: Option<&str>,
        columns: &[&str],
        since_hour: i64,
        until_hour: i64,
    ) -> Result<Vec<SummedCells>> {
        debug_assert!(columns.iter().all(|c| CELL_COLUMNS.contains(c)));
        let select: Vec<String> = columns
            .iter()
            .map(|c| format!("CAST({c} AS TEXT)"))
            .collect();
        let group = if columns.is_empty() {
            String::new()
        } else {
            format!("GROUP BY {}", columns.join(", "))
        };
        let sql = format!(
            "SELECT {}CAST(COALESCE(SUM(sent), 0) AS BIGINT), CAST(COALESCE(SUM(delivered), 0) AS BIGINT),
                    CAST(COALESCE(SUM(opened), 0) AS BIGINT)
             FROM stats_cells
             WHERE ($1 = '' OR enterprise_id = $1) AND send_hour >= $2 AND send_hour < $3 {group}",
            select.iter().map(|s| format!("{s}, ")).collect::<String>(),
        );
        let width = columns.len();
        on_pool!(self, pool => {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(enterprise_id.unwrap_or(""))
                .bind(since_hour)
                .bind(until_hour)
                .fetch_all(pool)
                .await?;
            rows.iter().map(|row| summed(row, width)).collect::<Result<Vec<_>, sqlx::Error>>()
        })
        .map_err(Into::into)
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
        let sql = format!(
            "SELECT {select}, CAST(SUM(c.sent) AS BIGINT), CAST(SUM(c.delivered) AS BIGINT), CAST(SUM(c.opened) AS BIGINT)
             FROM person_channels c {join}
             WHERE ($1 = '' OR c.enterprise_id = $1) GROUP BY {group}"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(enterprise_id.unwrap_or(""))
                .fetch_all(pool)
                .await?;
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
