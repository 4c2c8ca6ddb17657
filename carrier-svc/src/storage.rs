//! The carrier's own SQLite store. Every bulk operation is one statement per
//! chunk of rows; transactions never span a network call.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use chukei_proto::window::Window;

use crate::channels::{self, Contact};
use crate::model::{
    CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_SNS, Delivery, DeliveryState, Outgoing, Receipt,
    ReceiptKind, Subscriber, TerminalEvent, TerminalEventKind,
};

const ROWS_PER_STATEMENT: usize = 1_000;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
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

/// A held delivery as the push reads it: seq, delivery id, message id, user
/// id, channel, text, media URL, subject, suggested replies, trace, e-mail
/// address and SNS handle (empty unless its channel needs them).
type HeldRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

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

impl Store {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A batch is acked to the relay only after it reached the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A connection whose COMMIT failed (a full disk) still counts
            // itself in a transaction, and every later BEGIN on it would
            // fail: close it rather than reuse it (as the relay does).
            .after_release(|connection, _| {
                Box::pin(async move {
                    use sqlx::Connection;
                    connection.ping().await?;
                    Ok(!connection.is_in_transaction())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    pub fn sqlite_url_in(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("carrier.db").display())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn upsert_subscribers(&self, subscribers: &[Subscriber], now: i64) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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

    /// Points the users' messages at `endpoint`; held messages become pushable.
    pub async fn attach(&self, endpoint: &str, user_ids: &[String], now: i64) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
            // Whatever was pushed to a previous endpoint and never confirmed goes out again.
            let mut query =
                QueryBuilder::new("UPDATE deliveries SET state = 0 WHERE state = 1 AND user_id");
            in_list(&mut query, chunk.iter());
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await
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

    /// Stores a batch from the relay; delivery ids seen before are dropped.
    /// A delivery with a window is held for the window's current or next
    /// opening. Returns how many were new.
    pub async fn accept_batch(&self, deliveries: &[Delivery], now: i64) -> Result<u64> {
        let mut windows = WindowCache::default();
        let timed: Vec<(i64, i64, i64)> = deliveries
            .iter()
            .map(|d| {
                let (not_before, window_close) = match &d.window {
                    None => (d.not_before, i64::MAX),
                    // A window that never opens again: due to expire at once.
                    Some(window) => windows
                        .opening(window, now.max(d.not_before))
                        .map_or((d.not_before, i64::MIN), |(open, close)| {
                            (d.not_before.max(open), close)
                        }),
                };
                let segments = if d.channel == CHANNEL_SMS {
                    channels::sms_segments(&d.text).len() as i64
                } else {
                    0
                };
                (not_before, window_close, segments)
            })
            .collect();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut inserted = 0;
        for (chunk, timing) in deliveries
            .chunks(ROWS_PER_STATEMENT)
            .zip(timed.chunks(ROWS_PER_STATEMENT))
        {
            let mut query = QueryBuilder::new(
                "INSERT INTO deliveries (delivery_id, message_id, user_id, channel, content_text, media_url, subject, \
                 suggested_replies, not_before, expires_at, delivery_window, window_close, sms_segments, single_attempt, \
                 state, received_at, trace_parent, priority) ",
            );
            query.push_values(
                chunk.iter().zip(timing),
                |mut row, (d, (not_before, window_close, segments))| {
                    row.push_bind(&d.delivery_id)
                        .push_bind(&d.message_id)
                        .push_bind(&d.user_id)
                        .push_bind(d.channel)
                        .push_bind(&d.text)
                        .push_bind(&d.media_url)
                        .push_bind(&d.subject)
                        .push_bind(d.suggested_replies.join("\n"))
                        .push_bind(*not_before)
                        .push_bind(if *window_close == i64::MIN {
                            now
                        } else {
                            d.expires_at
                        })
                        .push_bind(&d.window)
                        .push_bind(if *window_close == i64::MIN {
                            now
                        } else {
                            *window_close
                        })
                        .push_bind(*segments)
                        .push_bind(d.single_attempt)
                        .push_bind(DeliveryState::Held as i64)
                        .push_bind(now)
                        .push_bind(&d.trace_parent)
                        .push_bind(d.priority);
                },
            );
            query.push(" ON CONFLICT (delivery_id) DO NOTHING");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Held deliveries due now for users attached at `endpoint`, with the
    /// subscriber contact details their channel adapters need: targeted
    /// messages' first (the relay's priority lane), then in arrival order.
    pub async fn due_for_endpoint(
        &self,
        endpoint: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<Outgoing>> {
        let mut rows = self.held_for_endpoint(true, endpoint, now, limit).await?;
        if rows.len() < limit as usize {
            let rest = limit - rows.len() as u32;
            rows.extend(self.held_for_endpoint(false, endpoint, now, rest).await?);
        }
        Ok(rows
            .into_iter()
            .map(
                |(
                    seq,
                    delivery_id,
                    message_id,
                    user_id,
                    channel,
                    text,
                    media_url,
                    subject,
                    replies,
                    trace_parent,
                    email,
                    sns_handle,
                )| Outgoing {
                    trace_parent,
                    seq,
                    delivery_id,
                    message_id,
                    user_id,
                    channel,
                    text,
                    media_url,
                    subject,
                    suggested_replies: replies
                        .split('\n')
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    contact: Contact { email, sns_handle },
                },
            )
            .collect())
    }

    /// Held deliveries of one lane due now for users attached at `endpoint`,
    /// in arrival order. The priority lane reads its partial index; the
    /// other reads the held rows by sequence and skips the few priority ones.
    async fn held_for_endpoint(
        &self,
        priority: bool,
        endpoint: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<HeldRow>> {
        // Named: without statistics the planner would scan every held row
        // by state to find the few priority ones.
        let (index, lane) = if priority {
            (
                "INDEXED BY deliveries_priority_held",
                "d.state = 0 AND d.priority",
            )
        } else {
            ("", "d.state = 0 AND NOT d.priority")
        };
        // Contact details are looked up only for the channels that need them.
        let sql = format!(
            "SELECT d.seq, d.delivery_id, d.message_id, d.user_id, d.channel, d.content_text, d.media_url,
                    d.subject, d.suggested_replies, d.trace_parent,
                    CASE WHEN d.channel = $4 THEN (SELECT s.email FROM subscribers s WHERE s.user_id = d.user_id) ELSE '' END,
                    CASE WHEN d.channel = $5 THEN (SELECT s.sns_handle FROM subscribers s WHERE s.user_id = d.user_id) ELSE '' END
             FROM deliveries d {index} JOIN attachments a ON a.user_id = d.user_id
             WHERE {lane} AND a.endpoint = $1 AND d.not_before <= $2 AND d.expires_at > $2
               AND d.window_close > $2
             ORDER BY d.seq LIMIT $3"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(endpoint)
            .bind(now)
            .bind(i64::from(limit))
            .bind(CHANNEL_EMAIL)
            .bind(CHANNEL_SNS)
            .fetch_all(&self.pool)
            .await
    }

    /// Deliveries the carrier itself cannot put on their channel (no e-mail
    /// address, no SNS handle): unsupported, reported to the relay.
    pub async fn mark_unsupported(&self, seqs: &[i64], now: i64) -> Result<usize> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut closed = Vec::new();
        for chunk in seqs.chunks(ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::new("UPDATE deliveries SET state = 5 WHERE state = 0 AND seq");
            in_list(&mut query, chunk.iter().copied());
            query.push(" RETURNING delivery_id, message_id, user_id, channel");
            closed.extend(query.build_query_as().fetch_all(&mut *tx).await?);
        }
        let queued = report_closed(&mut tx, closed, ReceiptKind::Unsupported, now).await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Drops the messages still held (not yet pushed) for these people;
    /// returns how many.
    pub async fn drop_held(&self, user_ids: &[&str]) -> Result<u64> {
        if user_ids.is_empty() {
            return Ok(0);
        }
        let mut query = QueryBuilder::new("DELETE FROM deliveries WHERE state = 0 AND user_id");
        in_list(&mut query, user_ids.iter().copied());
        Ok(query.build().execute(&self.pool).await?.rows_affected())
    }

    pub async fn mark_pushed(&self, seqs: &[i64]) -> Result<()> {
        for chunk in seqs.chunks(ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::new("UPDATE deliveries SET state = 1 WHERE state = 0 AND seq");
            in_list(&mut query, chunk.iter().copied());
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Pushed but unconfirmed deliveries of `endpoint`'s users are pushed again.
    pub async fn requeue_unconfirmed(&self, endpoint: &str) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 0 WHERE state = 1
             AND user_id IN (SELECT user_id FROM attachments WHERE endpoint = $1)",
        )
        .bind(endpoint)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies terminal events: each delivery moves forward at most once per
    /// state, each move adds one receipt to the outbox; sends and opens are
    /// counted once per person and message, however many channels reached them.
    /// Returns how many receipts were queued.
    pub async fn apply_terminal_events(&self, events: &[TerminalEvent]) -> Result<usize> {
        let by_id: HashMap<&str, &TerminalEvent> =
            events.iter().map(|e| (e.delivery_id.as_str(), e)).collect();
        let mut receipts = Vec::new();
        let mut counted: Vec<(String, Counted)> = Vec::new();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let ids = |wanted: &dyn Fn(TerminalEventKind) -> bool| -> Vec<&str> {
                chunk
                    .iter()
                    .filter(|e| wanted(e.kind))
                    .map(|e| e.delivery_id.as_str())
                    .collect()
            };
            // Any event but "unsupported" proves delivery; only reads prove an open.
            let steps = [
                (
                    "UPDATE deliveries SET state = 2 WHERE state < 2 AND delivery_id",
                    ids(&|k| k != TerminalEventKind::Unsupported),
                    ReceiptKind::Delivered,
                ),
                (
                    "UPDATE deliveries SET state = 3 WHERE state = 2 AND delivery_id",
                    ids(&|k| k == TerminalEventKind::Read),
                    ReceiptKind::Opened,
                ),
                (
                    "UPDATE deliveries SET state = 5 WHERE state < 2 AND delivery_id",
                    ids(&|k| k == TerminalEventKind::Unsupported),
                    ReceiptKind::Unsupported,
                ),
            ];
            for (update, ids, kind) in steps {
                if ids.is_empty() {
                    continue;
                }
                let mut query = QueryBuilder::new(update);
                in_list(&mut query, ids);
                query.push(
                    " RETURNING delivery_id, message_id, user_id, channel, sms_segments, single_attempt",
                );
                let moved: Vec<(String, String, String, i64, i64, bool)> =
                    query.build_query_as().fetch_all(&mut *tx).await?;
                // A person's only attempt counts as the person; where more attempts
                // may reach them, `reach` counts each person once.
                let (single, repeated): (Vec<_>, Vec<_>) =
                    moved.iter().partition(|(.., single)| *single);
                let people: Vec<(&str, &str)> = repeated
                    .iter()
                    .map(|(_, m, u, ..)| (m.as_str(), u.as_str()))
                    .collect();
                let step = match kind {
                    ReceiptKind::Delivered => Counted::Sent,
                    ReceiptKind::Opened => Counted::Opened,
                    _ => Counted::Unsupported,
                };
                if step != Counted::Unsupported {
                    counted.extend(single.iter().map(|(_, m, ..)| (m.clone(), step)));
                    let first = reach(&mut tx, &people, step == Counted::Opened).await?;
                    counted.extend(first.into_iter().map(|m| (m, step)));
                }
                match kind {
                    ReceiptKind::Delivered => {
                        for (_, message_id, .., segments, _) in &moved {
                            counted.push((message_id.clone(), Counted::Segments(*segments)));
                        }
                    }
                    ReceiptKind::Opened => {}
                    _ => {
                        for (_, message_id, ..) in &moved {
                            counted.push((message_id.clone(), Counted::Unsupported));
                        }
                    }
                }
                receipts.extend(
                    moved
                        .into_iter()
                        .map(|(id, message_id, user_id, channel, ..)| {
                            receipt(&by_id, id, message_id, user_id, channel, kind)
                        }),
                );
            }
        }
        queue_receipts(&mut tx, &receipts).await?;
        count(&mut tx, counted.iter().map(|(m, c)| (m.as_str(), *c))).await?;
        tx.commit().await?;
        Ok(receipts.len())
    }

    /// Expires deliveries whose expiry passed before the terminal confirmed
    /// them: they are never delivered later.
    pub async fn expire(&self, now: i64) -> Result<usize> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let expired = sqlx::query_as(
            "UPDATE deliveries SET state = 4 WHERE state < 2 AND expires_at <= $1
             RETURNING delivery_id, message_id, user_id, channel",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let queued = report_closed(&mut tx, expired, ReceiptKind::Expired, now).await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Held deliveries whose window closed before they could be pushed move
    /// to the window's next opening (or expire, when it has none). Returns
    /// how many moved.
    pub async fn roll_windows(&self, now: i64) -> Result<u64> {
        let windows: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT delivery_window FROM deliveries
             WHERE state = 0 AND window_close <= $1 AND delivery_window IS NOT NULL",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut cache = WindowCache::default();
        let mut moved = 0;
        for window in windows {
            let (not_before, window_close, expires) = match cache.opening(&window, now) {
                Some((open, close)) => (open, close, None),
                None => (now, now, Some(now)),
            };
            moved += sqlx::query(
                "UPDATE deliveries SET not_before = CASE WHEN not_before > $1 THEN not_before ELSE $1 END,
                        window_close = $2, expires_at = COALESCE($3, expires_at)
                 WHERE state = 0 AND window_close <= $4 AND delivery_window = $5",
            )
            .bind(not_before)
            .bind(window_close)
            .bind(expires)
            .bind(now)
            .bind(&window)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(moved)
    }

    /// Up to `limit` queued receipts after `after_seq`.
    pub async fn outbox_after(&self, after_seq: i64, limit: u32) -> Result<Vec<Receipt>> {
        type Row = (i64, String, String, String, i64, i64, i64, String, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, delivery_id, message_id, user_id, kind, channel, at, region, trace_parent FROM outbox
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    seq,
                    delivery_id,
                    message_id,
                    user_id,
                    kind,
                    channel,
                    at,
                    region,
                    trace_parent,
                )| Receipt {
                    trace_parent,
                    seq,
                    delivery_id,
                    message_id,
                    user_id,
                    kind: ReceiptKind::from_number(kind),
                    channel,
                    at,
                    region,
                },
            )
            .collect())
    }

    /// The relay stored every receipt up to `seq`.
    pub async fn ack_outbox(&self, seq: i64) -> Result<()> {
        sqlx::query("DELETE FROM outbox WHERE seq <= $1")
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Counts changed since the last report (and marks them reported).
    pub async fn take_changed_counts(&self) -> Result<Vec<MessageCount>> {
        let rows: Vec<CountRow> = sqlx::query_as(
            "UPDATE message_counts SET dirty = FALSE WHERE dirty
             RETURNING message_id, sent, opened, sms_segments, unsupported, expired",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(MessageCount::from_row).collect())
    }

    /// Marks every count as changed, so the next report repeats them all (after a reconnect).
    pub async fn mark_counts_changed(&self) -> Result<()> {
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
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 0")
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

/// Windows decoded once per stored form (a zone lookup is not free).
#[derive(Debug, Default)]
struct WindowCache(HashMap<String, Option<Window>>);

impl WindowCache {
    fn opening(&mut self, stored: &str, at: i64) -> Option<(i64, i64)> {
        self.0
            .entry(stored.to_owned())
            .or_insert_with(|| match Window::decode(stored) {
                Ok(window) => Some(window),
                Err(error) => {
                    tracing::warn!(%error, "unreadable window: delivering without it");
                    None
                }
            })
            .as_ref()
            .map_or(Some((at, i64::MAX)), |window| window.opening(at))
    }
}

fn receipt(
    by_id: &HashMap<&str, &TerminalEvent>,
    delivery_id: String,
    message_id: String,
    user_id: String,
    channel: i64,
    kind: ReceiptKind,
) -> Receipt {
    let event = by_id.get(delivery_id.as_str());
    Receipt {
        seq: 0,
        at: event.map_or(0, |e| e.at),
        region: event.map(|e| e.region.clone()).unwrap_or_default(),
        trace_parent: event.map(|e| e.trace_parent.clone()).unwrap_or_default(),
        delivery_id,
        message_id,
        user_id,
        kind,
        channel,
    }
}

/// Records that these people were reached (or, with `opened`, opened) and
/// returns the message id of each first time — the per-person counts.
async fn reach(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    people: &[(&str, &str)],
    opened: bool,
) -> Result<Vec<String>> {
    if people.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = if opened {
        let mut query = QueryBuilder::new("UPDATE reach SET opened = TRUE FROM (");
        query.push_values(people, |mut row, (message_id, user_id)| {
            row.push_bind(*message_id).push_bind(*user_id);
        });
        query.push(
            ") AS v WHERE reach.message_id = v.column1 AND reach.user_id = v.column2 AND NOT reach.opened \
             RETURNING reach.message_id",
        );
        query
    } else {
        let mut query = QueryBuilder::new("INSERT INTO reach (message_id, user_id) ");
        query.push_values(people, |mut row, (message_id, user_id)| {
            row.push_bind(*message_id).push_bind(*user_id);
        });
        query.push(" ON CONFLICT DO NOTHING RETURNING message_id");
        query
    };
    query.build_query_scalar().fetch_all(&mut **tx).await
}

/// What a counted step adds to a message's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Sent,
    Opened,
    Segments(i64),
    Unsupported,
    Expired,
}

/// Deliveries the carrier closed itself — (delivery id, message, user,
/// channel) — reported to the relay as `kind` at `now` and counted.
/// Returns how many receipts were queued.
async fn report_closed(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    closed: Vec<(String, String, String, i64)>,
    kind: ReceiptKind,
    now: i64,
) -> Result<usize> {
    let counted = match kind {
        ReceiptKind::Expired => Counted::Expired,
        _ => Counted::Unsupported,
    };
    let receipts: Vec<Receipt> = closed
        .into_iter()
        .map(|(delivery_id, message_id, user_id, channel)| Receipt {
            seq: 0,
            delivery_id,
            message_id,
            user_id,
            kind,
            channel,
            at: now,
            region: String::new(),
            trace_parent: String::new(),
        })
        .collect();
    queue_receipts(tx, &receipts).await?;
    count(
        tx,
        receipts.iter().map(|r| (r.message_id.as_str(), counted)),
    )
    .await?;
    Ok(receipts.len())
}

/// Appends receipts to the outbox.
async fn queue_receipts(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    receipts: &[Receipt],
) -> Result<()> {
    for chunk in receipts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO outbox (delivery_id, message_id, user_id, kind, channel, at, region, trace_parent) ",
        );
        query.push_values(chunk, |mut row, r| {
            row.push_bind(&r.delivery_id)
                .push_bind(&r.message_id)
                .push_bind(&r.user_id)
                .push_bind(r.kind as i64)
                .push_bind(r.channel)
                .push_bind(r.at)
                .push_bind(&r.region)
                .push_bind(&r.trace_parent);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Adds counted steps to the per-message counts (marked for the next report).
async fn count(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    steps: impl Iterator<Item = (&str, Counted)>,
) -> Result<()> {
    // sent, opened, sms segments, unsupported, expired
    let mut counts: HashMap<&str, [i64; 5]> = HashMap::new();
    for (message_id, step) in steps {
        let entry = counts.entry(message_id).or_default();
        match step {
            Counted::Sent => entry[0] += 1,
            Counted::Opened => entry[1] += 1,
            Counted::Segments(n) => entry[2] += n,
            Counted::Unsupported => entry[3] += 1,
            Counted::Expired => entry[4] += 1,
        }
    }
    let counts: Vec<(&str, [i64; 5])> = counts.into_iter().filter(|(_, c)| *c != [0; 5]).collect();
    for chunk in counts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO message_counts (message_id, sent, opened, sms_segments, unsupported, expired, dirty) ",
        );
        query.push_values(chunk, |mut row, (message_id, c)| {
            row.push_bind(*message_id);
            for value in c {
                row.push_bind(*value);
            }
            row.push_bind(true);
        });
        query.push(
            " ON CONFLICT (message_id) DO UPDATE SET sent = message_counts.sent + excluded.sent, \
             opened = message_counts.opened + excluded.opened, \
             sms_segments = message_counts.sms_segments + excluded.sms_segments, \
             unsupported = message_counts.unsupported + excluded.unsupported, \
             expired = message_counts.expired + excluded.expired, dirty = TRUE",
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: usize, priority: bool) -> Delivery {
        Delivery {
            delivery_id: format!("d{id}"),
            message_id: if priority {
                "urgent".into()
            } else {
                "campaign".into()
            },
            user_id: format!("u{}", id % 10),
            channel: 2,
            text: "hi".into(),
            media_url: String::new(),
            subject: String::new(),
            suggested_replies: Vec::new(),
            not_before: 0,
            expires_at: i64::MAX,
            window: None,
            single_attempt: true,
            trace_parent: String::new(),
            priority,
        }
    }

    /// A targeted message that arrives behind a campaign's backlog is pushed
    /// first; the backlog then goes in arrival order.
    #[tokio::test]
    async fn priority_deliveries_are_pushed_before_the_held_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&Store::sqlite_url_in(dir.path()))
            .await
            .unwrap();
        let users: Vec<String> = (0..10).map(|u| format!("u{u}")).collect();
        let subscribers: Vec<Subscriber> = users
            .iter()
            .map(|user_id| Subscriber {
                user_id: user_id.clone(),
                phone_number: "+819000000000".into(),
                name: String::new(),
                gender: 0,
                birth_date: "1990-01-01".into(),
                region: String::new(),
                occupation: String::new(),
                primary: true,
                email: String::new(),
                sns_handle: String::new(),
            })
            .collect();
        store.upsert_subscribers(&subscribers, 0).await.unwrap();
        store.attach("terminals", &users, 0).await.unwrap();
        let backlog: Vec<Delivery> = (0..50).map(|id| delivery(id, false)).collect();
        store.accept_batch(&backlog, 1).await.unwrap();
        store.accept_batch(&[delivery(50, true)], 2).await.unwrap();

        let due = store.due_for_endpoint("terminals", 3, 10).await.unwrap();
        let ids: Vec<&str> = due.iter().map(|d| d.delivery_id.as_str()).collect();
        assert_eq!(
            ids,
            ["d50", "d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"]
        );
        let all = store.due_for_endpoint("terminals", 3, 100).await.unwrap();
        assert_eq!(all.len(), 51, "each once");
        store.close().await;
    }
}
