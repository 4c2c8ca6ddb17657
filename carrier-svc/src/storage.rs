//! The carrier's own SQLite store: subscribers and where their terminals are
//! attached; the relay's batches, each message record kept as one row with
//! its recipients packed and one state byte per recipient (`packed`); the
//! receipt outbox towards the relay, one row per group of receipts; and
//! per-message counts for the periodic report. Every bulk operation is one
//! statement per chunk of rows; transactions never span a network call.
//!
//! A recipient moves forward only: held → pushed → delivered → opened, or to
//! expired, unsupported or dropped. Every change to a row's states reads and
//! writes them inside one `BEGIN IMMEDIATE` transaction, so two writers never
//! lose each other's changes.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use roaring::RoaringTreemap;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use crate::model::{MessageDeliveries, Receipt, ReceiptKind, Recipient, Subscriber};
use crate::packed;

mod accepting;
mod batches;
pub mod consents;
mod gateways;
mod receipts;
mod states;

pub use accepting::{Accepted, PushableNow};
use accepting::{Opening, Seen, insert_rows};
use batches::split_replies;
use receipts::queue_receipts;
use states::{State, change_states, state_rows};

const ROWS_PER_STATEMENT: usize = 1_000;
/// Batch rows read at a time by the push (each holds up to a relay batch).
const ROWS_PER_READ: i64 = 16;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    /// Every relay delivery id ever accepted: a batch the relay sends again
    /// (after a reconnect or a re-offer) is dropped by it. Rebuilt from the
    /// rows at start-up; a delivery id is added once its row has committed.
    seen: Arc<Seen>,
    /// Which endpoint each attached user's terminal is at, kept with the
    /// `attachments` table (its only writer is [`Store::attach`]).
    attached: Arc<RwLock<HashMap<String, Arc<str>>>>,
    /// Whose turn it is to write. SQLite has one writer; a second one of
    /// this process would wait for the lock in the busy handler's sleeps
    /// (1, 2, 5 … ms), so the writers queue here instead, first come, first
    /// served — a batch's commit does not sleep behind a terminal's
    /// receipts — except that a priority batch goes ahead of the writers
    /// still waiting.
    writer: Arc<chukei_proto::turn::Turn>,
    /// The outbox's receipts the relay holds: the sequence acked last
    /// ([`Store::ack_outbox`]) and the one they were removed through
    /// ([`Store::trim_outbox`]).
    outbox: Arc<OutboxMarks>,
}

/// How far the relay acked the outbox, and how far it was trimmed.
#[derive(Debug, Default)]
struct OutboxMarks {
    acked: std::sync::atomic::AtomicI64,
    trimmed: std::sync::atomic::AtomicI64,
}

/// Per-message counts as this carrier sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageCount {
    pub message_id: String,
    /// People the message reached (once each, however many channels).
    pub sent: u64,
    pub opened: u64,
    pub sms_segments: u64,
    pub unsupported: u64,
    pub expired: u64,
}

fn in_list<'t, T: sqlx::Encode<'t, Sqlite> + sqlx::Type<Sqlite>>(
    query: &mut QueryBuilder<Sqlite>,
    values: impl IntoIterator<Item = T>,
) {
    query.push(" IN (");
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value);
    }
    query.push(")");
}

fn unreadable(error: packed::Short) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(error))
}

impl Store {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A batch is acked to the relay only after it reached the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // No commit checkpoints the WAL, which held the write turn for
            // the copy and a sync of the database file: a task does, beside
            // the writer ([`Store::checkpoint_wal`]).
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // No ping on every acquire, nor on every release of a
            // connection not in a transaction: each is a round trip to its
            // worker thread (as the relay's pools, `relay_svc::storage::open`).
            .test_before_acquire(false)
            // A connection whose COMMIT failed (a full disk) still counts
            // itself in a transaction, and every later BEGIN on it would
            // fail: close it rather than reuse it. One from a dropped
            // transaction counts itself in it until its queued ROLLBACK has
            // run, which the ping waits for.
            .after_release(|connection, _| {
                Box::pin(async move {
                    use sqlx::Connection;
                    if !connection.is_in_transaction() {
                        return Ok(true);
                    }
                    connection.ping().await?;
                    Ok(!connection.is_in_transaction())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self {
            pool,
            seen: Arc::default(),
            outbox: Arc::default(),
            attached: Arc::default(),
            writer: Arc::default(),
        };
        store.upgrade_v1_rows().await?;
        store.load_seen_and_attached().await?;
        Ok(store)
    }

    /// Whether a priority batch asked for the write turn lately
    /// ([`chukei_proto::turn::Turn::ahead_lately`]).
    pub fn writers_ahead_lately(&self) -> bool {
        self.writer.ahead_lately()
    }

    /// Copies what the WAL holds into the database file as far as no
    /// reader still needs it (a passive checkpoint: it takes no write lock,
    /// so it runs beside whoever holds the write turn). Run by a task of
    /// the carrier's as on the relay, more often while priority batches are
    /// about (`chukei_proto::server::checkpoints`;
    /// `relay-svc/src/storage/checkpoint.rs` says why).
    pub async fn checkpoint_wal(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The endpoint `user_id`'s terminal is attached at, if any.
    pub fn endpoint_of(&self, user_id: &str) -> Option<String> {
        self.attached
            .read()
            .expect("attachments lock")
            .get(user_id)
            .map(|endpoint| endpoint.to_string())
    }

    /// A write transaction (`BEGIN IMMEDIATE`), begun in this store's turn
    /// to write; the turn ends when the returned guard is dropped, after
    /// the commit.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<(
        sqlx::Transaction<'static, Sqlite>,
        tokio::sync::OwnedMutexGuard<()>,
    )> {
        self.begin_write_ahead(false).await
    }

    /// [`Store::begin_write`], ahead of the writers still waiting when
    /// `ahead` (a priority batch).
    pub(crate) async fn begin_write_ahead(
        &self,
        ahead: bool,
    ) -> Result<(
        sqlx::Transaction<'static, Sqlite>,
        tokio::sync::OwnedMutexGuard<()>,
    )> {
        let turn = self.writer.take(ahead).await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((tx, turn))
    }

    /// This store's turn to write one statement outside a transaction.
    pub(crate) async fn write_turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.writer.take(false).await
    }

    pub fn sqlite_url_in(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("carrier.db").display())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Moves what version 1's per-delivery tables still hold into batch rows
    /// and the receipt outbox: held or pushed deliveries are held again (a
    /// terminal drops a delivery id it has seen), unsent receipts are queued.
    /// Nothing accepted before an upgrade is lost.
    async fn upgrade_v1_rows(&self) -> Result<()> {
        let (mut tx, _turn) = self.begin_write().await?;
        let rows: Vec<V1Delivery> = sqlx::query_as(
            "SELECT delivery_id, message_id, user_id, channel, content_text, media_url, subject,
                    suggested_replies, not_before, expires_at, delivery_window, single_attempt,
                    trace_parent, priority
             FROM deliveries_v1 WHERE state IN (0, 1) ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        let records = records_from_v1(rows);
        let moved: usize = records.iter().map(|r| r.recipients.len()).sum();
        let openings = Opening::of_each(&records, 0);
        insert_rows(&mut tx, &records, &openings, &[], 0).await?;
        sqlx::query("DELETE FROM deliveries_v1 WHERE state IN (0, 1)")
            .execute(&mut *tx)
            .await?;
        let receipts: Vec<V1Receipt> = sqlx::query_as(
            "SELECT delivery_id, message_id, user_id, kind, channel, at, region, trace_parent
             FROM outbox_v1 ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        let queued = receipts.len();
        let receipts: Vec<Receipt> = receipts.into_iter().map(V1Receipt::into_receipt).collect();
        queue_receipts(&mut tx, &receipts).await?;
        sqlx::query("DELETE FROM outbox_v1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if moved > 0 || queued > 0 {
            tracing::info!(
                deliveries = moved,
                receipts = queued,
                "version 1 rows moved to batch rows"
            );
        }
        Ok(())
    }

    async fn load_seen_and_attached(&self) -> Result<()> {
        let mut seen = [RoaringTreemap::new(), RoaringTreemap::new()];
        let blobs: Vec<(bool, Vec<u8>)> =
            sqlx::query_as("SELECT priority, recipients FROM batches")
                .fetch_all(&self.pool)
                .await?;
        for (priority, blob) in blobs {
            seen[usize::from(priority)].extend(packed::delivery_ids(&blob).map_err(unreadable)?);
        }
        // Version 1's rows: in both sets, whichever lane they came in.
        let old: Vec<String> = sqlx::query_scalar("SELECT delivery_id FROM deliveries_v1")
            .fetch_all(&self.pool)
            .await?;
        for lane in &mut seen {
            lane.extend(old.iter().filter_map(|id| id.parse::<u64>().ok()));
        }
        let [bulk, priority] = seen;
        *self.seen.bulk.lock().await = bulk;
        *self.seen.priority.lock().await = priority;
        let attached: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, endpoint FROM attachments")
                .fetch_all(&self.pool)
                .await?;
        let mut endpoints: HashMap<String, Arc<str>> = HashMap::new();
        let mut map = HashMap::with_capacity(attached.len());
        for (user_id, endpoint) in attached {
            let endpoint = endpoints
                .entry(endpoint.clone())
                .or_insert_with(|| endpoint.as_str().into())
                .clone();
            map.insert(user_id, endpoint);
        }
        *self.attached.write().expect("attachments lock") = map;
        Ok(())
    }

    pub async fn upsert_subscribers(&self, subscribers: &[Subscriber], now: i64) -> Result<()> {
        let (mut tx, _turn) = self.begin_write().await?;
        for chunk in subscribers.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "INSERT INTO subscribers (user_id, phone_number, name, gender, birth_date, region, occupation, is_primary, email, sns_handle, updated_at) ",
            );
            query.push_values(chunk, |mut row, s| {
                row.push_bind(&s.user_id)
                    .push_bind(&s.phone_number)
                    .push_bind(&s.name)
                    .push_bind(i64::from(s.gender))
                    .push_bind(&s.birth_date)
                    .push_bind(&s.region)
                    .push_bind(&s.occupation)
                    .push_bind(s.primary)
                    .push_bind(&s.email)
                    .push_bind(&s.sns_handle)
                    .push_bind(now);
            });
            query.push(
                " ON CONFLICT (user_id) DO UPDATE SET phone_number = excluded.phone_number, name = excluded.name, \
                 gender = excluded.gender, birth_date = excluded.birth_date, region = excluded.region, \
                 occupation = excluded.occupation, is_primary = excluded.is_primary, email = excluded.email, \
                 sns_handle = excluded.sns_handle, updated_at = excluded.updated_at",
            );
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// The subscribers among `user_ids`, keyed by user id.
    pub async fn subscribers(&self, user_ids: &[&str]) -> Result<HashMap<String, Subscriber>> {
        let mut found = HashMap::with_capacity(user_ids.len());
        for chunk in user_ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "SELECT user_id, phone_number, name, gender, birth_date, region, occupation, is_primary, email, sns_handle FROM subscribers WHERE user_id",
            );
            in_list(&mut query, chunk.iter().copied());
            type Row = (
                String,
                String,
                String,
                i64,
                String,
                String,
                String,
                bool,
                String,
                String,
            );
            let rows: Vec<Row> = query.build_query_as().fetch_all(&self.pool).await?;
            for (
                user_id,
                phone_number,
                name,
                gender,
                birth_date,
                region,
                occupation,
                primary,
                email,
                sns_handle,
            ) in rows
            {
                found.insert(
                    user_id.clone(),
                    Subscriber {
                        user_id,
                        phone_number,
                        name,
                        gender: gender as i32,
                        birth_date,
                        region,
                        occupation,
                        primary,
                        email,
                        sns_handle,
                    },
                );
            }
        }
        Ok(found)
    }

    /// Points the users' messages at `endpoint`; held messages become
    /// pushable, and whatever was pushed to a previous endpoint and never
    /// confirmed goes out again.
    pub async fn attach(&self, endpoint: &str, user_ids: &[String], now: i64) -> Result<()> {
        let (mut tx, _turn) = self.begin_write().await?;
        for chunk in user_ids.chunks(ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::new("INSERT INTO attachments (user_id, endpoint, attached_at) ");
            query.push_values(chunk, |mut row, user_id| {
                row.push_bind(user_id).push_bind(endpoint).push_bind(now);
            });
            query.push(
                " ON CONFLICT (user_id) DO UPDATE SET endpoint = excluded.endpoint, attached_at = excluded.attached_at",
            );
            query.build().execute(&mut *tx).await?;
        }
        let users: HashSet<&str> = user_ids.iter().map(String::as_str).collect();
        let rows = state_rows(&mut tx, "pushed > 0", &[]).await?;
        change_states(&mut tx, rows, |_, recipient, state| {
            (state == State::Pushed && users.contains(recipient.user_id.as_str()))
                .then_some(State::Held)
        })
        .await?;
        tx.commit().await?;
        let endpoint: Arc<str> = endpoint.into();
        let mut attached = self.attached.write().expect("attachments lock");
        for user_id in user_ids {
            attached.insert(user_id.clone(), endpoint.clone());
        }
        Ok(())
    }

    /// Every endpoint with attached users.
    pub async fn endpoints(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT endpoint FROM attachments")
            .fetch_all(&self.pool)
            .await
    }

    /// Whether any user is attached at `endpoint`.
    pub async fn endpoint_in_use(&self, endpoint: &str) -> Result<bool> {
        let attached: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM attachments WHERE endpoint = $1 LIMIT 1) AS any_user",
        )
        .bind(endpoint)
        .fetch_one(&self.pool)
        .await?;
        Ok(attached > 0)
    }

    /// Counts changed since the last report (and marks them reported).
    pub async fn take_changed_counts(&self) -> Result<Vec<MessageCount>> {
        let _turn = self.write_turn().await;
        let rows: Vec<CountRow> = sqlx::query_as(TAKE_CHANGED_COUNTS)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(MessageCount::from_row).collect())
    }

    /// Marks every count as changed, so the next report repeats them all (after a reconnect).
    pub async fn mark_counts_changed(&self) -> Result<()> {
        let _turn = self.write_turn().await;
        sqlx::query("UPDATE message_counts SET dirty = TRUE")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn counts(&self, message_id: Option<&str>) -> Result<(Vec<MessageCount>, u64)> {
        let rows: Vec<CountRow> = sqlx::query_as(
            "SELECT message_id, sent, opened, sms_segments, unsupported, expired FROM message_counts
             WHERE ($1 = '' OR message_id = $1) ORDER BY message_id",
        )
        .bind(message_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        let held: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(held), 0) FROM batches")
            .fetch_one(&self.pool)
            .await?;
        Ok((
            rows.into_iter().map(MessageCount::from_row).collect(),
            held as u64,
        ))
    }
}

type CountRow = (String, i64, i64, i64, i64, i64);

impl MessageCount {
    fn from_row((message_id, sent, opened, sms_segments, unsupported, expired): CountRow) -> Self {
        Self {
            message_id,
            sent: sent as u64,
            opened: opened as u64,
            sms_segments: sms_segments as u64,
            unsupported: unsupported as u64,
            expired: expired as u64,
        }
    }
}

/// Version 1's held deliveries (in their order) as packed records: one per
/// run of the same message and priority.
fn records_from_v1(rows: Vec<V1Delivery>) -> Vec<MessageDeliveries> {
    let mut records: Vec<MessageDeliveries> = Vec::new();
    for row in rows {
        let Ok(delivery_id) = row.delivery_id.parse::<u64>() else {
            continue;
        };
        let recipient = Recipient {
            delivery_id,
            user_id: row.user_id,
            channel: row.channel,
            not_before: row.not_before,
        };
        match records.last_mut() {
            Some(last) if last.message_id == row.message_id && last.priority == row.priority => {
                last.recipients.push(recipient)
            }
            _ => records.push(MessageDeliveries {
                message_id: row.message_id,
                text: row.content_text,
                media_url: row.media_url,
                subject: row.subject,
                suggested_replies: split_replies(&row.suggested_replies),
                expires_at: row.expires_at,
                window: row.delivery_window,
                single_attempt: row.single_attempt,
                trace_parent: row.trace_parent,
                priority: row.priority,
                recipients: vec![recipient],
            }),
        }
    }
    records
}

/// A held or pushed delivery in version 1's per-delivery table.
#[derive(sqlx::FromRow)]
struct V1Delivery {
    delivery_id: String,
    message_id: String,
    user_id: String,
    channel: i64,
    content_text: String,
    media_url: String,
    subject: String,
    suggested_replies: String,
    not_before: i64,
    expires_at: i64,
    delivery_window: Option<String>,
    single_attempt: bool,
    trace_parent: String,
    priority: bool,
}

/// An unsent receipt in version 1's per-receipt outbox.
#[derive(sqlx::FromRow)]
struct V1Receipt {
    delivery_id: String,
    message_id: String,
    user_id: String,
    kind: i64,
    channel: i64,
    at: i64,
    region: String,
    trace_parent: String,
}

impl V1Receipt {
    /// The receipt as the outbox queues it now.
    fn into_receipt(self) -> Receipt {
        Receipt {
            seq: 0,
            delivery_id: self.delivery_id.parse().unwrap_or(0),
            message_id: self.message_id,
            user_id: self.user_id,
            kind: ReceiptKind::from_number(self.kind),
            channel: self.channel,
            at: self.at,
            region: self.region,
            trace_parent: self.trace_parent,
        }
    }
}

/// The counts a report sends, through their partial index (migration 0008):
/// never a scan of every message the carrier has counted.
const TAKE_CHANGED_COUNTS: &str = "UPDATE message_counts SET dirty = FALSE WHERE dirty
     RETURNING message_id, sent, opened, sms_segments, unsupported, expired";

#[cfg(test)]
mod tests {
    use super::{Store, TAKE_CHANGED_COUNTS};

    #[tokio::test]
    async fn a_count_report_reads_only_the_counts_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&Store::sqlite_url_in(dir.path()))
            .await
            .unwrap();
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {TAKE_CHANGED_COUNTS}"
        )))
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let plan: Vec<&str> = plan.iter().map(|(.., detail)| detail.as_str()).collect();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX message_counts_dirty")),
            "{plan:?}"
        );
    }
}
