//! The carrier's own SQLite store. Every bulk operation is one statement per
//! chunk of rows; transactions never span a network call.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use crate::model::{
    Delivery, DeliveryState, Outgoing, Receipt, ReceiptKind, Subscriber, TerminalEvent,
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
    pub sent: u64,
    pub opened: u64,
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
                "INSERT INTO subscribers (user_id, phone_number, name, gender, birth_date, region, occupation, is_primary, updated_at) ",
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
                    .push_bind(now);
            });
            query.push(
                " ON CONFLICT (user_id) DO UPDATE SET phone_number = excluded.phone_number, name = excluded.name, \
                 gender = excluded.gender, birth_date = excluded.birth_date, region = excluded.region, \
                 occupation = excluded.occupation, is_primary = excluded.is_primary, updated_at = excluded.updated_at",
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
                "SELECT user_id, phone_number, name, gender, birth_date, region, occupation, is_primary FROM subscribers WHERE user_id",
            );
            in_list(&mut query, chunk.iter().copied());
            type Row = (String, String, String, i64, String, String, String, bool);
            let rows: Vec<Row> = query.build_query_as().fetch_all(&self.pool).await?;
            for (user_id, phone_number, name, gender, birth_date, region, occupation, primary) in
                rows
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
    /// Returns how many were new.
    pub async fn accept_batch(&self, deliveries: &[Delivery], now: i64) -> Result<u64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut inserted = 0;
        for chunk in deliveries.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "INSERT INTO deliveries (delivery_id, message_id, user_id, channel, content_text, media_url, not_before, expires_at, state, received_at) ",
            );
            query.push_values(chunk, |mut row, d| {
                row.push_bind(&d.delivery_id)
                    .push_bind(&d.message_id)
                    .push_bind(&d.user_id)
                    .push_bind(d.channel)
                    .push_bind(&d.text)
                    .push_bind(&d.media_url)
                    .push_bind(d.not_before)
                    .push_bind(d.expires_at)
                    .push_bind(DeliveryState::Held as i64)
                    .push_bind(now);
            });
            query.push(" ON CONFLICT (delivery_id) DO NOTHING");
            inserted += query.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Held deliveries due now for users attached at `endpoint`.
    pub async fn due_for_endpoint(
        &self,
        endpoint: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<Outgoing>> {
        let rows: Vec<(i64, String, String, String, i64, String, String)> = sqlx::query_as(
            "SELECT d.seq, d.delivery_id, d.message_id, d.user_id, d.channel, d.content_text, d.media_url
             FROM deliveries d JOIN attachments a ON a.user_id = d.user_id
             WHERE a.endpoint = $1 AND d.state = 0 AND d.not_before <= $2 AND d.expires_at > $2
             ORDER BY d.seq LIMIT $3",
        )
        .bind(endpoint)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, delivery_id, message_id, user_id, channel, text, media_url)| Outgoing {
                    seq,
                    delivery_id,
                    message_id,
                    user_id,
                    channel,
                    text,
                    media_url,
                },
            )
            .collect())
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
    /// state, each move adds one receipt to the outbox and one to the counts.
    /// Returns how many receipts were queued.
    pub async fn apply_terminal_events(&self, events: &[TerminalEvent]) -> Result<usize> {
        let by_id: HashMap<&str, &TerminalEvent> =
            events.iter().map(|e| (e.delivery_id.as_str(), e)).collect();
        let mut receipts = Vec::new();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            // Any event proves delivery; only reads prove an open.
            let all: Vec<&str> = chunk.iter().map(|e| e.delivery_id.as_str()).collect();
            let reads: Vec<&str> = chunk
                .iter()
                .filter(|e| e.read)
                .map(|e| e.delivery_id.as_str())
                .collect();
            let steps = [
                (
                    "UPDATE deliveries SET state = 2 WHERE state < 2 AND delivery_id",
                    all,
                    ReceiptKind::Delivered,
                ),
                (
                    "UPDATE deliveries SET state = 3 WHERE state = 2 AND delivery_id",
                    reads,
                    ReceiptKind::Opened,
                ),
            ];
            for (update, ids, kind) in steps {
                if ids.is_empty() {
                    continue;
                }
                let mut query = QueryBuilder::new(update);
                in_list(&mut query, ids);
                query.push(" RETURNING delivery_id, message_id, user_id, channel");
                let moved: Vec<(String, String, String, i64)> =
                    query.build_query_as().fetch_all(&mut *tx).await?;
                receipts.extend(moved.into_iter().map(|(id, message_id, user_id, channel)| {
                    receipt(&by_id, &id, message_id, user_id, channel, kind)
                }));
            }
        }
        queue_receipts(&mut tx, &receipts).await?;
        tx.commit().await?;
        Ok(receipts.len())
    }

    /// Fails deliveries whose expiry passed before the terminal confirmed them.
    pub async fn expire(&self, now: i64) -> Result<usize> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let expired: Vec<(String, String, i64)> = sqlx::query_as(
            "UPDATE deliveries SET state = 4 WHERE state < 2 AND expires_at <= $1
             RETURNING message_id, user_id, channel",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let receipts: Vec<Receipt> = expired
            .into_iter()
            .map(|(message_id, user_id, channel)| Receipt {
                seq: 0,
                message_id,
                user_id,
                kind: ReceiptKind::Failed,
                channel,
                at: now,
                region: String::new(),
            })
            .collect();
        queue_receipts(&mut tx, &receipts).await?;
        tx.commit().await?;
        Ok(receipts.len())
    }

    /// Up to `limit` queued receipts after `after_seq`.
    pub async fn outbox_after(&self, after_seq: i64, limit: u32) -> Result<Vec<Receipt>> {
        let rows: Vec<(i64, String, String, i64, i64, i64, String)> = sqlx::query_as(
            "SELECT seq, message_id, user_id, kind, channel, at, region FROM outbox
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, message_id, user_id, kind, channel, at, region)| Receipt {
                    seq,
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
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "UPDATE message_counts SET dirty = FALSE WHERE dirty RETURNING message_id, sent, opened",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(message_id, sent, opened)| MessageCount {
                message_id,
                sent: sent as u64,
                opened: opened as u64,
            })
            .collect())
    }

    /// Marks every count as changed, so the next report repeats them all (after a reconnect).
    pub async fn mark_counts_changed(&self) -> Result<()> {
        sqlx::query("UPDATE message_counts SET dirty = TRUE")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn counts(&self, message_id: Option<&str>) -> Result<(Vec<MessageCount>, u64)> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT message_id, sent, opened FROM message_counts
             WHERE ($1 = '' OR message_id = $1) ORDER BY message_id",
        )
        .bind(message_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 0")
            .fetch_one(&self.pool)
            .await?;
        Ok((
            rows.into_iter()
                .map(|(message_id, sent, opened)| MessageCount {
                    message_id,
                    sent: sent as u64,
                    opened: opened as u64,
                })
                .collect(),
            held as u64,
        ))
    }
}

fn receipt(
    by_id: &HashMap<&str, &TerminalEvent>,
    delivery_id: &str,
    message_id: String,
    user_id: String,
    channel: i64,
    kind: ReceiptKind,
) -> Receipt {
    let event = by_id.get(delivery_id);
    Receipt {
        seq: 0,
        message_id,
        user_id,
        kind,
        channel,
        at: event.map_or(0, |e| e.at),
        region: event.map(|e| e.region.clone()).unwrap_or_default(),
    }
}

/// Appends receipts to the outbox and adds them to the per-message counts.
async fn queue_receipts(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    receipts: &[Receipt],
) -> Result<()> {
    for chunk in receipts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO outbox (message_id, user_id, kind, channel, at, region) ",
        );
        query.push_values(chunk, |mut row, r| {
            row.push_bind(&r.message_id)
                .push_bind(&r.user_id)
                .push_bind(r.kind as i64)
                .push_bind(r.channel)
                .push_bind(r.at)
                .push_bind(&r.region);
        });
        query.build().execute(&mut **tx).await?;
    }
    let mut counts: HashMap<&str, (i64, i64)> = HashMap::new();
    for r in receipts {
        let entry = counts.entry(r.message_id.as_str()).or_default();
        match r.kind {
            ReceiptKind::Delivered => entry.0 += 1,
            ReceiptKind::Opened => entry.1 += 1,
            ReceiptKind::Failed => {}
        }
    }
    let counts: Vec<(&str, (i64, i64))> =
        counts.into_iter().filter(|(_, c)| *c != (0, 0)).collect();
    for chunk in counts.chunks(ROWS_PER_STATEMENT) {
        let mut query =
            QueryBuilder::new("INSERT INTO message_counts (message_id, sent, opened, dirty) ");
        query.push_values(chunk, |mut row, (message_id, (sent, opened))| {
            row.push_bind(*message_id)
                .push_bind(*sent)
                .push_bind(*opened)
                .push_bind(true);
        });
        query.push(
            " ON CONFLICT (message_id) DO UPDATE SET sent = message_counts.sent + excluded.sent, \
             opened = message_counts.opened + excluded.opened, dirty = TRUE",
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}
