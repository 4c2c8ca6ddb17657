//! Acquisition in SQL: receipts deduplicated into `events` (one row per
//! message, user and kind, however many carriers or retries report it), the
//! carriers' count reports beside them, and the counts derived from events.

use std::collections::HashMap;

use const_format::formatcp;
use sqlx::{AssertSqlSafe, QueryBuilder};

use super::states::{CANCELLED, EXPIRED, HANDED_OVER, OPEN, UNSENT, UNSUPPORTED};
use super::{
    IdList, KeepsPlans, ROWS_PER_STATEMENT, Store, WritePool, on_pool, on_write, transaction_steps,
};
use crate::error::Result;
use crate::policy::SCORE_OPEN_SHIFT;
use crate::receipts::{CountReport, DEFERRED_COUNT, EventKind, Receipt};
use crate::targeting::Channel;

/// Per-message counts, each derived from deduplicated events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub failed: u64,
    pub expired: u64,
    pub unsupported: u64,
    pub skipped: u64,
    /// Deliveries deferred by quiet periods (not an event kind).
    pub deferred: u64,
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
                Some(EventKind::Expired) => counts.expired = count,
                Some(EventKind::Unsupported) => counts.unsupported = count,
                Some(EventKind::Skipped) => counts.skipped = count,
                None if kind == DEFERRED_COUNT => counts.deferred = count,
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
    pub reported_sms_segments: u64,
}

/// Receipts recorded in one transaction at most, on an idle write turn.
const RECEIPTS_PER_TRANSACTION: u32 = 1_000;

impl Store {
    /// Records receipts from `carrier_id`. A receipt counts only for a delivery
    /// the relay made to that carrier; a read implies delivered, and delivered
    /// implies handed over, so the funnel stays consistent when a receipt is lost.
    ///
    /// In the same transaction, what the receipts mean for delivery control:
    /// a first open cancels the person's pending attempts of that message,
    /// lifts their engagement score and schedules the message's follow-up for
    /// them; an unsupported channel wakes the policy at once; an expiry at the
    /// carrier closes the attempt. Returns how many follow-up attempts were
    /// planned (in the bulk lane, on whichever carriers the openers are with).
    ///
    /// A carrier's batch may hold thousands of receipts. They are recorded
    /// in slices, each its own transaction: [`RECEIPTS_PER_TRANSACTION`],
    /// and an eighth of that while targeted messages are being accepted
    /// ([`Store::bulk_slice`]), so none holds the write turn for long. The
    /// caller acks the batch once every slice has committed; after a crash
    /// between slices the carrier sends the batch again, and the receipts
    /// already recorded add nothing (each event is unique), so nothing
    /// counts twice.
    pub async fn record_receipts(
        &self,
        carrier_id: &str,
        receipts: &[Receipt],
        now: i64,
    ) -> Result<u64> {
        let slice = self.bulk_slice(RECEIPTS_PER_TRANSACTION) as usize;
        let mut planned = 0;
        for receipts in receipts.chunks(slice.max(1)) {
            planned += self.record_receipt_slice(carrier_id, receipts, now).await?;
        }
        Ok(planned)
    }

    /// One transaction of [`Store::record_receipts`].
    async fn record_receipt_slice(
        &self,
        carrier_id: &str,
        receipts: &[Receipt],
        now: i64,
    ) -> Result<u64> {
        let rows = event_rows(receipts);
        let attempts_with = |kind: EventKind| -> Vec<i64> {
            receipts
                .iter()
                .filter(|r| r.kind == kind)
                .filter_map(|r| r.delivery_id)
                .collect()
        };
        let unsupported = attempts_with(EventKind::Unsupported);
        let expired = attempts_with(EventKind::Expired);
        let close_unsupported = format!(
            "UPDATE deliveries SET state = {UNSUPPORTED}, check_at = $2, note = 'the terminal does not support this channel'
             WHERE state IN {OPEN} AND carrier_id = $3 AND {}",
            self.in_id_list("id", 1)
        );
        let close_expired = format!(
            "UPDATE deliveries SET state = {EXPIRED}, check_at = NULL, note = 'expired at the carrier before it reached the terminal'
             WHERE state IN {OPEN} AND carrier_id = $2 AND {}",
            self.in_id_list("id", 1)
        );
        on_pool!(self, pool, groups => {
            let mut tx = groups.deliveries.join(pool).await?;
            let opened = tx.record_events(carrier_id, &rows, now).await?;
            if !unsupported.is_empty() {
                sqlx::query(AssertSqlSafe(close_unsupported))
                    .bind(IdList(&unsupported))
                    .bind(now)
                    .bind(carrier_id)
                    .execute(&mut *tx)
                    .await?;
            }
            if !expired.is_empty() {
                sqlx::query(AssertSqlSafe(close_expired))
                    .bind(IdList(&expired))
                    .bind(carrier_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let planned = tx.act_on_opens(&opened, now).await?;
            tx.commit().await?;
            Ok(planned)
        })
    }

    /// Keeps the latest count report of the carrier for each message.
    pub async fn store_count_report(&self, carrier_id: &str, report: &CountReport) -> Result<()> {
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in report.counts.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(
                    "INSERT INTO count_reports (carrier_id, message_id, sent, opened, sms_segments, reported_at) ",
                );
                query.push_values(chunk, |mut row, count| {
                    row.push_bind(carrier_id)
                        .push_bind(&count.message_id)
                        .push_bind(count.sent as i64)
                        .push_bind(count.opened as i64)
                        .push_bind(count.sms_segments as i64)
                        .push_bind(report.at);
                });
                query.push(
                    " ON CONFLICT (carrier_id, message_id) DO UPDATE SET sent = excluded.sent, \
                     opened = excluded.opened, sms_segments = excluded.sms_segments, reported_at = excluded.reported_at \
                     WHERE excluded.reported_at >= count_reports.reported_at",
                );
                query.build().persistent(false).execute(&mut *tx).await?;
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
        // Deferrals are not events: they are carried over as maintained.
        let rows: Vec<(i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT kind, COUNT(*) FROM events WHERE message_id = $1 GROUP BY kind
             UNION ALL SELECT kind, count FROM message_counts WHERE message_id = $1 AND kind = 8",
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
        // (carrier, a, b, c): three figures per carrier from each table.
        type PerCarrier = Vec<(String, i64, i64, i64)>;
        let (deliveries, events, reports): (PerCarrier, PerCarrier, PerCarrier) = on_pool!(self, pool => {
            let deliveries = sqlx::query_as(
                formatcp!("SELECT carrier_id, COUNT(*) FILTER (WHERE state IN {UNSENT}),
                        COUNT(*) FILTER (WHERE state = {HANDED_OVER} OR handed_over_at IS NOT NULL), CAST(0 AS BIGINT)
                 FROM deliveries WHERE ($1 = '' OR message_id = $1) GROUP BY carrier_id"),
            )
            .bind(message)
            .fetch_all(pool)
            .await?;
            let events = sqlx::query_as(
                "SELECT carrier_id, COUNT(*) FILTER (WHERE kind = 2), COUNT(*) FILTER (WHERE kind = 3), CAST(0 AS BIGINT)
                 FROM events WHERE ($1 = '' OR message_id = $1) GROUP BY carrier_id",
            )
            .bind(message)
            .fetch_all(pool)
            .await?;
            let reports = sqlx::query_as(
                "SELECT carrier_id, CAST(COALESCE(SUM(sent), 0) AS BIGINT), CAST(COALESCE(SUM(opened), 0) AS BIGINT),
                        CAST(COALESCE(SUM(sms_segments), 0) AS BIGINT)
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
                let find = |rows: &[(String, i64, i64, i64)]| {
                    rows.iter()
                        .find(|(c, ..)| *c == id)
                        .map_or((0, 0, 0), |(_, a, b, c)| (*a as u64, *b as u64, *c as u64))
                };
                let (pending, handed_over, _) = find(&deliveries);
                let (delivered, opened, _) = find(&events);
                let (reported_sent, reported_opened, reported_sms_segments) = find(&reports);
                CarrierCounts {
                    carrier_id: id.clone(),
                    pending,
                    handed_over,
                    delivered,
                    opened,
                    reported_sent,
                    reported_opened,
                    reported_sms_segments,
                }
            })
            .collect())
    }
}

/// One event row per key among `receipts` (each with the implied kinds),
/// in receipt order.
fn event_rows(receipts: &[Receipt]) -> Vec<(&Receipt, EventKind)> {
    // One row per event key, the earliest report of it: a read implies a
    // delivery, but when the delivery's own receipt is in the same batch
    // its time is the delivery's, not the read's. (Left to the database,
    // which duplicate wins depends on the join order the planner picks.)
    let mut earliest: HashMap<(&str, &str, EventKind), &Receipt> = HashMap::new();
    for receipt in receipts {
        for kind in receipt.kind.implied() {
            earliest
                .entry((&receipt.message_id, &receipt.user_id, *kind))
                .and_modify(|kept| {
                    if receipt.at < kept.at {
                        *kept = receipt;
                    }
                })
                .or_insert(receipt);
        }
    }
    let mut rows: Vec<(&Receipt, EventKind)> = earliest
        .into_iter()
        .map(|((_, _, kind), receipt)| (receipt, kind))
        .collect();
    // In key order, as the hand-over's mark inserts its events
    // (`transfer.rs`): on PostgreSQL two transactions inserting the same
    // keys in different orders each wait for the other's, a deadlock found
    // only after `deadlock_timeout` (1 s), and one of them is rolled back.
    // A receipt that overtakes its acknowledgement (the carrier pushes
    // while it commits) adds the handed-over event the mark adds too.
    rows.sort_by(|(a, a_kind), (b, b_kind)| {
        (&a.message_id, &a.user_id, a_kind.number()).cmp(&(
            &b.message_id,
            &b.user_id,
            b_kind.number(),
        ))
    });
    rows
}

/// The handed-over event's number, spliced into the receipts' insert.
const HANDED_OVER_EVENT: i64 = EventKind::HandedOver.number();

/// Receipt batches up to this many rows (targeted messages') keep their
/// statement prepared where the backend [`KeepsPlans`]: at most this many
/// texts of each kind on the writer connection, whose cache holds 64
/// statements in all (`open.rs`), so the other writers' stay in it.
const KEPT_UP_TO_ROWS: usize = 8;

/// A first open just recorded: message, user, channel and when.
type Opened = (String, String, i64, i64);

transaction_steps! {
    /// What a batch of receipts does inside its transaction.
    trait ReceiptSteps {
        /// Inserts the events of `rows` from `carrier_id` that are new (and
        /// for a delivery made to that carrier) — counted by the database as
        /// they are added (migration 0016) —; the first opens among them.
        async fn record_events(
            &mut self,
            carrier_id: &str,
            rows: &[(&Receipt, EventKind)],
            now: i64,
        ) -> Result<Vec<Opened>> {
            // Only the opens come back (to act on): the rest are counted
            // where they are added, and none of them crosses back as a row.
            let (opens, others): (Vec<_>, Vec<_>) =
                rows.iter().partition(|(_, kind)| *kind == EventKind::Opened);
            let mut opened: Vec<Opened> = Vec::new();
            for (rows, returning) in [(others, false), (opens, true)] {
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    // Driven by the VALUES rows, a unique-index lookup each:
                    // the delivery is a probe, not `EXISTS` (see the
                    // `storage` module).
                    let mut query = QueryBuilder::new(
                        "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region)
                         SELECT v.column1, v.column2, v.column3, v.column4, ",
                    );
                    query.push_bind(carrier_id).push(", v.column5, v.column6 FROM (");
                    query.push_values(chunk, |mut row, (receipt, kind)| {
                        row.push_bind(&receipt.message_id)
                            .push_bind(&receipt.user_id)
                            .push_bind(kind.number())
                            .push_bind(receipt.at)
                            .push_bind(Channel::number(receipt.channel))
                            .push_bind(&receipt.region);
                    });
                    // A handed-over event implied by a later receipt is
                    // there already when the delivery was marked handed
                    // over (the mark adds it in the same transaction, and
                    // events are never removed): only a receipt that
                    // overtook its acknowledgement adds it, and the others
                    // cost no probe of the events' key.
                    query
                        .push(") AS v WHERE (SELECT 1 FROM deliveries d WHERE d.message_id = v.column1 AND d.user_id = v.column2 AND d.carrier_id = ")
                        .push_bind(carrier_id)
                        .push(formatcp!(
                            " AND (v.column3 <> {HANDED_OVER_EVENT} OR d.handed_over_at IS NULL) LIMIT 1) IS NOT NULL ON CONFLICT DO NOTHING"
                        ));
                    // Planned on every run on PostgreSQL, like the hand-over's
                    // statements (`transfer.rs`); on SQLite a few rows' texts
                    // (a targeted message's receipts) stay prepared, while a
                    // text per larger row count would fill the cache.
                    let keep = Self::KEEPS_PLANS && chunk.len() <= KEPT_UP_TO_ROWS;
                    if !returning {
                        query.build().persistent(keep).execute(&mut *self).await?;
                        continue;
                    }
                    query.push(" RETURNING message_id, user_id, channel, at");
                    let inserted: Vec<(String, String, i64, i64)> =
                        query.build_query_as().persistent(keep).fetch_all(&mut *self).await?;
                    for (message_id, user_id, channel, at) in inserted {
                        opened.push((message_id, user_id, channel, if at > 0 { at } else { now }));
                    }
                }
            }
            Ok(opened)
        }

        /// A first open cancels the person's pending attempts of that
        /// message, lifts their engagement score and plans the message's
        /// follow-up for them; how many follow-up attempts that planned.
        async fn act_on_opens(&mut self, opened: &[Opened], now: i64) -> Result<u64> {
            let mut attempts = 0;
            for chunk in opened.chunks(ROWS_PER_STATEMENT) {
                let values = |query: &mut QueryBuilder<_>| {
                    query.push_values(chunk, |mut row, (message_id, user_id, channel, at)| {
                        row.push_bind(message_id).push_bind(user_id).push_bind(*channel).push_bind(*at);
                    });
                };
                let mut cancel = QueryBuilder::new(
                    formatcp!("UPDATE deliveries SET state = {CANCELLED}, note = 'cancelled: the person opened another attempt'
                     FROM ("),
                );
                values(&mut cancel);
                cancel.push(formatcp!(") AS v WHERE deliveries.message_id = v.column1 AND deliveries.user_id = v.column2 AND deliveries.state IN {UNSENT}"));
                cancel.build().persistent(false).execute(&mut *self).await?;

                let mut engage = QueryBuilder::new("UPDATE engagement SET score = score + (1000 - score) / ");
                engage.push_bind(SCORE_OPEN_SHIFT).push(" WHERE user_id IN (");
                let mut list = engage.separated(", ");
                for (_, user_id, ..) in chunk {
                    list.push_bind(user_id);
                }
                engage.push(")");
                engage.build().persistent(false).execute(&mut *self).await?;

                let mut follow = QueryBuilder::new(
                    "INSERT INTO deliveries (message_id, user_id, carrier_id, channel, attempt, state, not_before, reason)
                     SELECT m.follow_up_id, c.user_id, c.carrier_id, COALESCE(NULLIF(f.channel, 0), v.column3), 0,
                            CASE WHEN v.column4 + m.follow_up_delay_ms > ",
                );
                follow.push_bind(now).push(
                    " THEN 6 ELSE 0 END, v.column4 + m.follow_up_delay_ms, 'follow-up: the person opened the original'
                     FROM (",
                );
                values(&mut follow);
                follow.push(
                    ") AS v JOIN messages m ON m.id = v.column1 AND m.follow_up_id IS NOT NULL
                     JOIN messages f ON f.id = m.follow_up_id
                     JOIN contracts c ON c.user_id = v.column2 AND (c.is_primary OR f.all_carriers)
                     WHERE f.expires_at > v.column4 ON CONFLICT DO NOTHING RETURNING message_id, user_id",
                );
                let planned: Vec<(String, String)> = follow.build_query_as().persistent(false).fetch_all(&mut *self).await?;
                attempts += planned.len() as u64;
                let mut people: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
                for (message_id, user_id) in planned {
                    people.entry(message_id).or_default().insert(user_id);
                }
                for (message_id, users) in people {
                    sqlx::query("UPDATE messages SET matched = COALESCE(matched, 0) + $2 WHERE id = $1")
                        .bind(&message_id)
                        .bind(users.len() as i64)
                        .execute(&mut *self)
                        .await?;
                }
            }
            Ok(attempts)
        }
    }
}
