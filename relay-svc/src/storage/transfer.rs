//! What the dispatchers read and write: due deliveries for one carrier, in id
//! order, and the batch acknowledgement that marks them handed over.

use std::sync::Arc;

use const_format::formatcp;
use sqlx::AssertSqlSafe;

use super::states::{EXPANDED, HANDED_OVER, PENDING, UNSENT};
use super::{CountSteps, IdList, Store, on_pool, on_write, stored_list};
use crate::error::Result;
use crate::receipts::{EventKind, MessageEventKind};
use crate::targeting::{Channel, Content};

/// One delivery ready to hand to its carrier, with its message's instructions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueDelivery {
    pub id: i64,
    pub message_id: String,
    pub user_id: String,
    pub channel: Option<Channel>,
    pub not_before: i64,
    /// What every delivery of the message shares, read once per batch.
    pub message: Arc<DueMessage>,
}

/// A due message's content and instructions: one per message in a batch,
/// however many of its deliveries the batch holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueMessage {
    pub content: Content,
    pub expires_at: i64,
    /// The window in its stored form, when the carrier is to hold the delivery.
    pub carrier_window: Option<String>,
    /// The person's only attempt for this message on this carrier.
    pub single_attempt: bool,
    /// The message's trace (W3C traceparent; empty: not traced).
    pub trace_parent: String,
}

/// One message's due deliveries in a lane's read: the message's columns
/// once, its deliveries as packed columns (JSON arrays, element `i` of each
/// the same delivery), so a batch crosses from the database as a row per
/// message, not a row per person.
#[derive(sqlx::FromRow)]
struct DueGroupRow {
    #[sqlx(flatten)]
    message: DueMessageRow,
    ids: String,
    user_ids: String,
    channels: String,
    not_befores: String,
}

#[derive(sqlx::FromRow)]
struct DueMessageRow {
    message_id: String,
    content_text: String,
    media_url: String,
    subject: String,
    suggested_replies: String,
    expires_at: i64,
    carrier_window: Option<String>,
    single_attempt: bool,
    trace_parent: String,
}

impl DueMessageRow {
    /// The message's id and what its deliveries share.
    fn shared(self) -> (String, Arc<DueMessage>) {
        let message = DueMessage {
            content: Content {
                text: self.content_text,
                media_url: self.media_url,
                subject: self.subject,
                suggested_replies: stored_list(Some(&self.suggested_replies)),
            },
            expires_at: self.expires_at,
            carrier_window: self.carrier_window,
            single_attempt: self.single_attempt,
            trace_parent: self.trace_parent,
        };
        (self.message_id, Arc::new(message))
    }
}

/// The message columns a due read returns, `messages` aliased `m`.
const DUE_MESSAGE_COLUMNS: &str =
    "m.content_text, m.media_url, m.subject, m.suggested_replies, m.expires_at,
    CASE WHEN m.window_at_carrier THEN m.delivery_window END AS carrier_window,
    m.single_attempt, m.trace_parent";

/// A message's due deliveries unpacked from their JSON columns.
struct DueColumns {
    ids: Vec<i64>,
    user_ids: Vec<String>,
    channels: Vec<i64>,
    not_befores: Vec<i64>,
}

impl DueColumns {
    fn unpack(group: &DueGroupRow) -> Result<Self> {
        fn column<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<Vec<T>> {
            serde_json::from_str(text).map_err(|error| {
                crate::error::Error::Internal(anyhow::anyhow!(
                    "due deliveries: packed column {name} unreadable: {error}"
                ))
            })
        }
        let columns = Self {
            ids: column("ids", &group.ids)?,
            user_ids: column("user_ids", &group.user_ids)?,
            channels: column("channels", &group.channels)?,
            not_befores: column("not_befores", &group.not_befores)?,
        };
        let len = columns.ids.len();
        if [
            columns.user_ids.len(),
            columns.channels.len(),
            columns.not_befores.len(),
        ] != [len; 3]
        {
            return Err(crate::error::Error::Internal(anyhow::anyhow!(
                "due deliveries: packed columns of different lengths"
            )));
        }
        Ok(columns)
    }

    fn into_deliveries(
        self,
        message_id: &str,
        message: &Arc<DueMessage>,
    ) -> impl Iterator<Item = DueDelivery> {
        self.ids
            .into_iter()
            .zip(self.user_ids)
            .zip(self.channels.into_iter().zip(self.not_befores))
            .map(move |((id, user_id), (channel, not_before))| DueDelivery {
                id,
                message_id: message_id.to_owned(),
                user_id,
                channel: Channel::from_number(channel),
                not_before,
                message: message.clone(),
            })
    }
}

/// A carrier's two queues: targeted messages' first attempts go before
/// campaigns', whatever their ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    Priority = 0,
    Bulk = 1,
}

/// A message (`m`) every matched person of which has been handed over.
pub(super) const EVERYONE_HANDED_OVER: &str = formatcp!(
    "m.state = {EXPANDED} AND m.matched > 0
     AND COALESCE((SELECT c.count FROM message_counts c WHERE c.message_id = m.id AND c.kind = 1), 0) >= m.matched"
);

impl Store {
    /// Up to `limit` pending deliveries of `carrier_id` with ids above
    /// `after_id` that may go now (not before their time, inside a window held
    /// at the relay, not expired), in id order, from both lanes.
    pub async fn due_deliveries(
        &self,
        carrier_id: &str,
        after_id: i64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        // Each lane is one index range; merged here, not sorted by the database.
        let mut due = Vec::new();
        for lane in [Lane::Priority, Lane::Bulk] {
            due.extend(
                self.due_in_lane(carrier_id, lane, after_id..i64::MAX, now, limit)
                    .await?,
            );
        }
        due.sort_unstable_by_key(|d| d.id);
        due.truncate(limit as usize);
        Ok(due)
    }

    /// [`Store::due_deliveries`] of one lane, with ids above `ids.start`
    /// and below `ids.end`.
    pub async fn due_in_lane(
        &self,
        carrier_id: &str,
        lane: Lane,
        ids: std::ops::Range<i64>,
        now: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        // A constant in the text, so the lane is part of the index range
        // (carrier, state, lane, id). The rows, in id order and limited,
        // are grouped by message: one row per message comes back (one for a
        // campaign's batch, whose content is then read once), its
        // deliveries packed.
        let lane_number = lane as i64;
        let (lane_range, lane_order) = match self {
            Store::Sqlite(..) => (
                format!(
                    "d.carrier_id = $1 AND d.state = {PENDING} AND d.lane = {lane_number} AND d.id > $2 AND d.id < $5"
                ),
                "d.id",
            ),
            // PostgreSQL read the id range through the primary key instead,
            // filtering out every other carrier's and every handed-over row
            // (~35–50 ms a read late in a 100k campaign, all its rows removed
            // by the filter), whenever its statistics still counted the
            // campaign's rows as pending, which they did until the next
            // `ANALYZE`. Here the lane and the id are one row value, ordered
            // as `deliveries_due` is past its equal carrier and state: no other
            // index serves that order, and its lower bound positions the
            // scan. Its upper bound ends the scan at the lane's end only, so
            // the catch-up read (`ids.end` below the cursor) walks the
            // lane's pending rows above it.
            Store::Postgres(..) => (
                format!(
                    "d.carrier_id = $1 AND d.state = {PENDING}
                     AND (d.lane, d.id) > ({lane_number}, $2) AND (d.lane, d.id) < ({lane_number}, $5)"
                ),
                "d.lane, d.id",
            ),
        };
        let packed = |column: &str| self.json_array_of(&format!("d.{column}"));
        let sql = format!(
            "SELECT m.id AS message_id, {DUE_MESSAGE_COLUMNS},
                    {ids} AS ids, {users} AS user_ids, {channels} AS channels, {not_befores} AS not_befores
             FROM (SELECT d.id, d.message_id, d.user_id, d.channel, d.not_before
                   FROM deliveries d JOIN messages m ON m.id = d.message_id
                   WHERE {lane_range} AND d.not_before <= $3
                     AND (d.window_close IS NULL OR d.window_close > $3) AND m.expires_at > $3
                   ORDER BY {lane_order}
                   LIMIT $4) AS d
             JOIN messages m ON m.id = d.message_id
             GROUP BY m.id",
            ids = packed("id"),
            users = packed("user_id"),
            channels = packed("channel"),
            not_befores = packed("not_before"),
        );
        let groups: Vec<DueGroupRow> = on_pool!(self, pool => sqlx::query_as(AssertSqlSafe(sql))
            .bind(carrier_id)
            .bind(ids.start)
            .bind(now)
            .bind(i64::from(limit))
            .bind(ids.end)
            .fetch_all(pool)
            .await)?;
        let mut due = Vec::new();
        for group in groups {
            let unpacked = DueColumns::unpack(&group)?;
            let (message_id, message) = group.message.shared();
            due.extend(unpacked.into_deliveries(&message_id, &message));
        }
        due.sort_unstable_by_key(|d| d.id);
        Ok(due)
    }

    /// The carrier acknowledged a batch: its deliveries are handed over (and
    /// start their policy's timer), and a handed-over event is recorded once
    /// per message and user. The same few statements whatever the batch
    /// holds — one campaign or a thousand targeted messages — each driven by
    /// the batch's ids (primary-key lookups), never by a scan of the
    /// carrier's deliveries.
    pub async fn mark_handed_over(&self, ids: &[i64], now: i64) -> Result<()> {
        self.mark_handed_over_in(Lane::Bulk, ids, now).await
    }

    /// [`Store::mark_handed_over`] for a batch of `lane`: the priority
    /// lane's marks commit with the accepts, ahead of the other writers
    /// waiting for SQLite's write turn. The stream's dispatcher reads the
    /// lane's next rows only once its acked batch is marked, and behind a
    /// campaign's writers a targeted message waited 17 ms at the median
    /// (90 ms at p99) between its accept and that read during a 1M
    /// broadcast.
    ///
    /// A bulk batch is marked in slices while targeted messages are being
    /// accepted ([`Store::bulk_slice`]), each slice its own member of the
    /// deliveries' group, so an accept waits for a slice, not for the
    /// thousand rows. A crash between slices leaves the rest pending, to be
    /// handed over again, as a crash before the mark would.
    pub async fn mark_handed_over_in(&self, lane: Lane, ids: &[i64], now: i64) -> Result<()> {
        let slice = match lane {
            Lane::Priority => ids.len(),
            Lane::Bulk => {
                let full = u32::try_from(ids.len()).unwrap_or(u32::MAX);
                self.bulk_slice(full) as usize
            }
        };
        for ids in ids.chunks(slice.max(1)) {
            self.mark_slice_handed_over(lane, ids, now).await?;
        }
        Ok(())
    }

    /// One transaction of [`Store::mark_handed_over_in`].
    async fn mark_slice_handed_over(&self, lane: Lane, ids: &[i64], now: i64) -> Result<()> {
        // Counted by the database as they are added (migration 0016).
        let record = format!(
            "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region)
             SELECT d.message_id, d.user_id, $1, $2, d.carrier_id, d.channel, ''
             FROM deliveries d
             WHERE {}
             ORDER BY d.message_id, d.user_id
             ON CONFLICT DO NOTHING",
            self.in_id_list("d.id", 3)
        );
        // The batch's messages, for their `message.handed_over` event (only
        // while some webhook endpoint listens; it is recorded for those
        // everyone of which is handed over, once).
        let batch_messages = format!(
            "SELECT DISTINCT message_id FROM deliveries WHERE {}",
            self.in_id_list("id", 1)
        );
        // Fallback and resend wait for an open from the hand-over on.
        let advance = format!(
            "UPDATE deliveries SET state = {HANDED_OVER}, handed_over_at = $2, window_close = NULL,
                check_at = (SELECT CASE WHEN m.policy IN ('fallback', 'resend') AND m.timeout_ms > 0
                                        THEN $2 + m.timeout_ms END
                            FROM messages m WHERE m.id = deliveries.message_id)
             WHERE state = {PENDING} AND {}",
            self.in_id_list("id", 1)
        );
        let kind = EventKind::HandedOver.number();
        let listening = self.webhooks_listening();
        let keep = self.keeps_plans();
        // Every carrier's acks share transactions with the other hot writers
        // of their lane's group.
        on_pool!(self, pool, groups => {
            let group = match lane {
                Lane::Priority => &groups.accepts,
                Lane::Bulk => &groups.deliveries,
            };
            let mut tx = group.join(pool).await?;
            // On PostgreSQL both statements are planned on every run, for the
            // ids at hand. A prepared statement keeps its plan per
            // connection, and PostgreSQL switches to a generic plan after
            // five runs: one made while `deliveries` was small (a fresh hub's
            // first targeted messages) was a scan, kept once the table held a
            // campaign — each 1,000-row hand-over then took 0.5 s instead of
            // 0.05 s. Per batch, the planning is noise. SQLite keeps them
            // prepared ([`super::KeepsPlans`]): preparing them again took
            // longer than running them for a targeted message's one row.
            sqlx::query(AssertSqlSafe(record))
                .persistent(keep)
                .bind(kind)
                .bind(now)
                .bind(IdList(ids))
                .execute(&mut *tx)
                .await?;
            if listening {
                let messages: Vec<String> = sqlx::query_scalar(AssertSqlSafe(batch_messages))
                    .persistent(keep)
                    .bind(IdList(ids))
                    .fetch_all(&mut *tx)
                    .await?;
                let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
                tx.record_message_events(&messages, MessageEventKind::HandedOver, EVERYONE_HANDED_OVER, now)
                    .await?;
            }
            sqlx::query(AssertSqlSafe(advance))
                .persistent(keep)
                .bind(IdList(ids))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn pending_count(&self, carrier_id: &str) -> Result<u64> {
        let count: i64 = on_pool!(self, pool => sqlx::query_scalar(
            formatcp!("SELECT COUNT(*) FROM deliveries WHERE carrier_id = $1 AND state IN {UNSENT}"),
        )
        .bind(carrier_id)
        .fetch_one(pool)
        .await)?;
        Ok(count as u64)
    }

    /// Per registered carrier: deliveries due now and not yet handed over,
    /// and since when the oldest of them has been due.
    pub async fn pending_by_carrier(&self, now: i64) -> Result<Vec<(String, u64, Option<i64>)>> {
        let rows: Vec<(String, i64, Option<i64>)> = on_pool!(self, pool => sqlx::query_as(
            formatcp!("SELECT c.id, COUNT(d.id), MIN(d.not_before) FROM carriers c
             LEFT JOIN deliveries d ON d.carrier_id = c.id AND d.state = {PENDING} AND d.not_before <= $1
             GROUP BY c.id ORDER BY c.id"),
        )
        .bind(now)
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(carrier, count, oldest)| (carrier, count.max(0) as u64, oldest))
            .collect())
    }

    /// Up to `limit` erasure notices waiting for `carrier_id`, oldest first:
    /// `(id, user_id, enterprise_id)`.
    pub async fn outbox(&self, carrier_id: &str, limit: u32) -> Result<Vec<(i64, String, String)>> {
        Ok(on_pool!(self, pool => sqlx::query_as(
            "SELECT id, user_id, enterprise_id FROM outbox WHERE carrier_id = $1 ORDER BY id LIMIT $2",
        )
        .bind(carrier_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?)
    }

    /// Deletes notices `ids` the carrier acknowledged.
    pub async fn outbox_done(&self, carrier_id: &str, ids: &[i64]) -> Result<()> {
        let sql = format!(
            "DELETE FROM outbox WHERE carrier_id = $1 AND {}",
            self.in_id_list("id", 2)
        );
        on_write!(self, pool => sqlx::query(AssertSqlSafe(sql))
            .bind(carrier_id)
            .bind(IdList(ids))
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
