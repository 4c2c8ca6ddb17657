//! Acquisition in SQL: receipts deduplicated into `events` (one row per
//! message, user and kind, however many carriers or retries report it), the
//! carriers' count reports beside them, and the counts derived from events.

use std::collections::HashMap;

use sqlx::QueryBuilder;

use super::{ROWS_PER_STATEMENT, Store, WritePool, add_to_counts, on_pool};
use crate::error::Result;
use crate::receipts::{CountReport, EventKind, Receipt};
use crate::targeting::Channel;

/// Per-message counts, each derived from deduplicated events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub failed: u64,
}

impl MessageCounts {
    fn from_rows(rows: Vec<(i64, i64)>) -> Self {
        let mut counts = Self::default();
        for (kind, count) in rows {
            let count = count as u64;
            match EventKind::from_number(kind) {
                Some(EventKind::HandedOver) => counts.handed_over = count,
                Some(EventKind::Delivered) => counts.delivered = count,
                Some(EventKind::Opened) => counts.opened = count,
                Some(EventKind::Failed) => counts.failed = count,
                None => {}
            }
        }
        counts
    }
}

/// The operator's per-carrier view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CarrierCounts {
    pub carrier_id: String,
    pub pending: u64,
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub reported_sent: u64,
    pub reported_opened: u64,
}

impl Store {
    /// Records receipts from `carrier_id`. A receipt counts only for a delivery
    /// the relay made to that carrier; a read implies delivered, and delivered
    /// implies handed over, so the funnel stays consistent when a receipt is lost.
    pub async fn record_receipts(&self, carrier_id: &str, receipts: &[Receipt]) -> Result<()> {
        let rows: Vec<(&Receipt, EventKind)> = receipts
            .iter()
            .flat_map(|receipt| {
                receipt
                    .kind
                    .implied()
                    .iter()
                    .map(move |kind| (receipt, *kind))
            })
            .collect();
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut added: HashMap<(String, i64), i64> = HashMap::new();
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                // Driven by the VALUES rows (a unique-index lookup each); the rows the
                // insert really added come back, to grow their messages' counts.
                let mut query = QueryBuilder::new(
                    "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region)
                     SELECT v.column1, v.column2, v.column3, v.column4, d.carrier_id, v.column5, v.column6 FROM (",
                );
                query.push_values(chunk, |mut row, (receipt, kind)| {
                    row.push_bind(&receipt.message_id)
                        .push_bind(&receipt.user_id)
                        .push_bind(kind.number())
                        .push_bind(receipt.at)
                        .push_bind(Channel::number(receipt.channel))
                        .push_bind(&receipt.region);
                });
                query
                    .push(") AS v JOIN deliveries d ON d.message_id = v.column1 AND d.user_id = v.column2 AND d.carrier_id = ")
                    .push_bind(carrier_id)
                    .push(" WHERE TRUE ON CONFLICT DO NOTHING RETURNING message_id, kind");
                let inserted: Vec<(String, i64)> = query.build_query_as().fetch_all(&mut *tx).await?;
                for key in inserted {
                    *added.entry(key).or_default() += 1;
                }
            }
            add_to_counts!(tx, added);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Keeps the latest count report of the carrier for each message.
    pub async fn store_count_report(&self, carrier_id: &str, report: &CountReport) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in report.counts.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(
                    "INSERT INTO count_reports (carrier_id, message_id, sent, opened, reported_at) ",
                );
                query.push_values(chunk, |mut row, count| {
                    row.push_bind(carrier_id)
                        .push_bind(&count.message_id)
                        .push_bind(count.sent as i64)
                        .push_bind(count.opened as i64)
                        .push_bind(report.at);
                });
                query.push(
                    " ON CONFLICT (carrier_id, message_id) DO UPDATE SET sent = excluded.sent, \
                     opened = excluded.opened, reported_at = excluded.reported_at \
                     WHERE excluded.reported_at >= count_reports.reported_at",
                );
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// A message's counts, as maintained beside its events.
    pub async fn message_counts(&self, message_id: &str) -> Result<MessageCounts> {
        let rows: Vec<(i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT kind, count FROM message_counts WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_all(pool)
        .await)?;
        Ok(MessageCounts::from_rows(rows))
    }

    /// A message's counts recomputed from its events (slow: a check that the
    /// maintained counts are right, never a hot path).
    pub async fn recount_message(&self, message_id: &str) -> Result<MessageCounts> {
        let rows: Vec<(i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT kind, COUNT(*) FROM events WHERE message_id = $1 GROUP BY kind",
        )
        .bind(message_id)
        .fetch_all(pool)
        .await)?;
        Ok(MessageCounts::from_rows(rows))
    }

    /// Per carrier: deliveries waiting and handed over, events attributed to
    /// it and its own reports — for one message or all.
    pub async fn carrier_counts(&self, message_id: Option<&str>) -> Result<Vec<CarrierCounts>> {
        let message = message_id.unwrap_or("");
        type PerCarrier = Vec<(String, i64, i64)>;
        let (deliveries, events, reports): (PerCarrier, PerCarrier, PerCarrier) = on_pool!(self, pool => {
            let deliveries = sqlx::query_as(
                "SELECT carrier_id, COUNT(*) FILTER (WHERE state = 0), COUNT(*) FILTER (WHERE state <> 0)
                 FROM deliveries WHERE ($1 = '' OR message_id = $1) GROUP BY carrier_id",
            )
            .bind(message)
            .fetch_all(pool)
            .await?;
            let events = sqlx::query_as(
                "SELECT carrier_id, COUNT(*) FILTER (WHERE kind = 2), COUNT(*) FILTER (WHERE kind = 3)
                 FROM events WHERE ($1 = '' OR message_id = $1) GROUP BY carrier_id",
            )
            .bind(message)
            .fetch_all(pool)
            .await?;
            let reports = sqlx::query_as(
                "SELECT carrier_id, CAST(COALESCE(SUM(sent), 0) AS BIGINT), CAST(COALESCE(SUM(opened), 0) AS BIGINT)
                 FROM count_reports WHERE ($1 = '' OR message_id = $1) GROUP BY carrier_id",
            )
            .bind(message)
            .fetch_all(pool)
            .await?;
            (deliveries, events, reports)
        });
        let carriers = self.carriers().await?;
        Ok(carriers
            .into_iter()
            .map(|carrier| {
                let id = carrier.carrier_id;
                let find = |rows: &[(String, i64, i64)]| {
                    rows.iter()
                        .find(|(c, ..)| *c == id)
                        .map_or((0, 0), |(_, a, b)| (*a as u64, *b as u64))
                };
                let (pending, handed_over) = find(&deliveries);
                let (delivered, opened) = find(&events);
                let (reported_sent, reported_opened) = find(&reports);
                CarrierCounts {
                    carrier_id: id.clone(),
                    pending,
                    handed_over,
                    delivered,
                    opened,
                    reported_sent,
                    reported_opened,
                }
            })
            .collect())
    }
}
