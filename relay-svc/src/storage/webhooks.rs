//! Status webhooks in SQL: the enterprises' endpoints, each with a cursor in
//! the events log and the batch it is delivering, the per-message sequence
//! numbers and the attempts log (`crate::webhooks` says what they mean).

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, QueryBuilder};

use super::stats::EventLog;
use super::{Store, WritePool, on_pool, transaction_steps};
use crate::error::{Error, Result};

/// Events in one POST at most.
pub const MAX_EVENTS: i64 = 1_000;
/// Log entries one batch may span (events of other enterprises and types
/// included). Twice a full batch: each event is read about twice when the
/// log is all the endpoint's, and a sparse log is skipped a window at a time.
const WINDOW: i64 = 2 * MAX_EVENTS;

/// An endpoint as stored (its secrets are the sender's, never shown again).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EndpointRow {
    pub id: String,
    pub enterprise_id: String,
    pub url: String,
    pub types: i64,
    pub message_id: String,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_until: Option<i64>,
    pub state: i64,
    pub disabled_reason: String,
    pub log_tx: i64,
    pub log_seq: i64,
    pub batch_id: Option<String>,
    pub batch_tx: Option<i64>,
    pub batch_seq: Option<i64>,
    pub batch_events: Option<i64>,
    pub batch_since: Option<i64>,
    pub failures: i64,
    pub failing_since: Option<i64>,
    pub next_attempt_at: i64,
    pub created_at: i64,
}

impl EndpointRow {
    pub fn enabled(&self) -> bool {
        self.state == 0
    }

    /// The secrets that sign a request at `now`: the current one, and the
    /// previous one while it is still valid.
    pub fn signing_secrets(&self, now: i64) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(previous), Some(until)) = (&self.previous_secret, self.previous_until)
            && until > now
        {
            secrets.push(previous);
        }
        secrets
    }
}

/// One event of a batch, as read from the log.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct BatchEvent {
    pub tx: i64,
    pub seq: i64,
    pub kind: i64,
    pub at: i64,
    pub channel: i64,
    pub message_id: String,
    /// `""` for the message's own events.
    pub user_ref: String,
    /// The message's counts as JSON (its own events only).
    pub detail: Option<String>,
}

/// What an endpoint has next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// A batch to send.
    Batch(Batch),
    /// Its cursor moved past events that are not its own: look again.
    Skipped,
    /// Nothing new in the log (or another relay fixed the batch).
    Idle,
}

/// What an endpoint is to be sent next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The `webhook-id` of every attempt of this batch.
    pub webhook_id: String,
    /// The batch ends here in the log (the cursor moves here once delivered).
    pub end: (i64, i64),
    pub events: Vec<BatchEvent>,
    /// Per message of the batch, the sequence number of its first event here.
    pub first_sequence: HashMap<String, i64>,
}

/// One attempt, as the enterprise reads it back.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AttemptRow {
    pub webhook_id: String,
    pub at: i64,
    pub events: i64,
    pub status: i64,
    pub outcome: String,
    pub duration_ms: i64,
    pub error: String,
}

/// How an attempt ended, to record.
#[derive(Clone, Debug)]
pub struct Attempt<'a> {
    pub webhook_id: &'a str,
    pub at: i64,
    pub events: i64,
    pub status: i64,
    pub duration_ms: i64,
    pub error: &'a str,
}

const COLUMNS: &str = "id, enterprise_id, url, types, message_id, secret, previous_secret, previous_until, state, \
     disabled_reason, log_tx, log_seq, batch_id, batch_tx, batch_seq, batch_events, batch_since, failures, failing_since, next_attempt_at, created_at";

impl Store {
    /// Whether some enterprise has an enabled webhook endpoint (as last
    /// looked up): a message's own events are written only then.
    pub(crate) fn webhooks_listening(&self) -> bool {
        on_pool!(self, _pool, groups => groups.webhooks_listening.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn set_webhooks_listening(&self, listening: bool) {
        on_pool!(self, _pool, groups => groups.webhooks_listening.store(listening, std::sync::atomic::Ordering::Relaxed));
    }

    /// Looks up whether some endpoint is enabled (at start, and at each
    /// of the webhook sender's polls, so a relay learns of an endpoint
    /// another relay added within a poll).
    pub async fn refresh_webhooks_listening(&self) -> Result<()> {
        let listening: bool = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE state = 0)",
        )
        .fetch_one(pool)
        .await)?;
        self.set_webhooks_listening(listening);
        Ok(())
    }

    /// Adds an endpoint of `enterprise_id`, sent the events that happen from
    /// now on (its cursor starts at the log's newest event).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_webhook(
        &self,
        id: &str,
        enterprise_id: &str,
        url: &str,
        types: i64,
        message_id: &str,
        secret: &str,
        now: i64,
    ) -> Result<EndpointRow> {
        let log = self.event_log();
        let head = format!(
            "SELECT {} AS tx, e.seq FROM events e ORDER BY {} LIMIT 1",
            log.tx, log.newest_first
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (log_tx, log_seq): (i64, i64) = sqlx::query_as(AssertSqlSafe(head))
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or((0, 0));
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, enterprise_id, url, types, message_id, secret, log_tx, log_seq,
                                                next_attempt_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
            )
            .bind(id)
            .bind(enterprise_id)
            .bind(url)
            .bind(types)
            .bind(message_id)
            .bind(secret)
            .bind(log_tx)
            .bind(log_seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<(), Error>(())
        })?;
        self.set_webhooks_listening(true);
        self.webhook(Some(enterprise_id), id).await
    }

    /// One endpoint, of `enterprise_id` when given ("not found" otherwise).
    pub async fn webhook(&self, enterprise_id: Option<&str>, id: &str) -> Result<EndpointRow> {
        let query = format!(
            "SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1 AND ($2 = '' OR enterprise_id = $2)"
        );
        let row: Option<EndpointRow> = on_pool!(self, pool => sqlx::query_as(AssertSqlSafe(query))
            .bind(id)
            .bind(enterprise_id.unwrap_or(""))
            .fetch_optional(pool)
            .await)?;
        row.ok_or_else(|| Error::not_found("webhook_id", "no such webhook endpoint"))
    }

    /// An enterprise's endpoints, oldest first.
    pub async fn webhooks(&self, enterprise_id: &str) -> Result<Vec<EndpointRow>> {
        let query = format!(
            "SELECT {COLUMNS} FROM webhook_endpoints WHERE enterprise_id = $1 ORDER BY created_at, id"
        );
        Ok(on_pool!(self, pool => sqlx::query_as(AssertSqlSafe(query))
            .bind(enterprise_id)
            .fetch_all(pool)
            .await)?)
    }

    /// Removes an endpoint, its sequence numbers and its attempts.
    pub async fn delete_webhook(&self, enterprise_id: &str, id: &str) -> Result<()> {
        self.webhook(Some(enterprise_id), id).await?;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for table in ["webhook_sequences", "webhook_attempts"] {
                sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE endpoint_id = $1")))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// A new secret for an endpoint; the current one keeps signing (beside
    /// it) until `previous_until`.
    pub async fn rotate_webhook_secret(
        &self,
        enterprise_id: &str,
        id: &str,
        secret: &str,
        previous_until: i64,
    ) -> Result<EndpointRow> {
        self.webhook(Some(enterprise_id), id).await?;
        on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = $2, secret = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(previous_until)
        .bind(secret)
        .execute(pool)
        .await
        .map(drop))?;
        self.webhook(Some(enterprise_id), id).await
    }

    /// Enables an endpoint again (after a 410 or days of failures) and sends
    /// at once, from where delivery stopped: nothing was skipped meanwhile.
    pub async fn resume_webhook(
        &self,
        enterprise_id: &str,
        id: &str,
        now: i64,
    ) -> Result<EndpointRow> {
        self.webhook(Some(enterprise_id), id).await?;
        on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_endpoints SET state = 0, disabled_reason = '', failures = 0, failing_since = NULL,
                    next_attempt_at = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(pool)
        .await
        .map(drop))?;
        self.set_webhooks_listening(true);
        self.webhook(Some(enterprise_id), id).await
    }

    /// An endpoint's latest attempts, newest first.
    pub async fn webhook_attempts(
        &self,
        enterprise_id: &str,
        id: &str,
        limit: i64,
    ) -> Result<Vec<AttemptRow>> {
        self.webhook(Some(enterprise_id), id).await?;
        Ok(on_pool!(self, pool => sqlx::query_as(
            "SELECT webhook_id, at, events, status, outcome, duration_ms, error FROM webhook_attempts
             WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
    }

    /// Enabled endpoints due for an attempt at `now`, soonest first.
    pub async fn due_webhooks(&self, now: i64, limit: i64) -> Result<Vec<String>> {
        Ok(on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM webhook_endpoints WHERE state = 0 AND next_attempt_at <= $1
             ORDER BY next_attempt_at, id LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
    }

    /// Takes an endpoint due at `now` for `lease_ms` (no other relay sends to
    /// it meanwhile); `None` when another relay took it first.
    pub async fn claim_webhook(
        &self,
        id: &str,
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<EndpointRow>> {
        let claimed = on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_endpoints SET next_attempt_at = $3 WHERE id = $1 AND state = 0 AND next_attempt_at <= $2",
        )
        .bind(id)
        .bind(now)
        .bind(now + lease_ms)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        if claimed == 0 {
            return Ok(None);
        }
        self.webhook(None, id).await.map(Some)
    }

    /// Frees an endpoint taken with nothing to send: it is looked at again
    /// from `now` on.
    pub async fn release_webhook(&self, id: &str, now: i64) -> Result<()> {
        on_pool!(self, pool => sqlx::query("UPDATE webhook_endpoints SET next_attempt_at = $2 WHERE id = $1 AND state = 0")
            .bind(id)
            .bind(now)
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    /// The batch `endpoint` is to be sent: the one it is already delivering,
    /// or the next events past its cursor, fixed (its end and webhook id
    /// stored) before it is first sent.
    pub async fn webhook_batch(&self, endpoint: &EndpointRow, webhook_id: &str) -> Result<Next> {
        let log = self.event_log();
        let cursor = (endpoint.log_tx, endpoint.log_seq);
        if let (Some(id), Some(tx), Some(seq)) =
            (&endpoint.batch_id, endpoint.batch_tx, endpoint.batch_seq)
        {
            let events = self
                .endpoint_events(log, endpoint, cursor, (tx, seq))
                .await?;
            return self
                .with_sequences(endpoint, id, (tx, seq), events)
                .await
                .map(Next::Batch);
        }
        let window = format!(
            "SELECT tx, seq FROM (SELECT {tx} AS tx, e.seq AS seq FROM events e WHERE {past} AND {ready}
                                  ORDER BY {order} LIMIT $1) AS w
             ORDER BY tx DESC, seq DESC LIMIT 1",
            tx = log.tx,
            past = log.past,
            ready = log.ready,
            order = log.order,
        );
        let end: Option<(i64, i64)> = on_pool!(self, pool => sqlx::query_as(AssertSqlSafe(window))
            .bind(WINDOW)
            .bind(cursor.0)
            .bind(cursor.1)
            .fetch_optional(pool)
            .await)?;
        let Some(end) = end else {
            return Ok(Next::Idle);
        };
        let events = self.endpoint_events(log, endpoint, cursor, end).await?;
        let Some(last) = events.last() else {
            // Nothing of this endpoint's in the window: the cursor moves past it.
            on_pool!(self, pool => sqlx::query(
                "UPDATE webhook_endpoints SET log_tx = $2, log_seq = $3 WHERE id = $1 AND batch_id IS NULL",
            )
            .bind(&endpoint.id)
            .bind(end.0)
            .bind(end.1)
            .execute(pool)
            .await
            .map(drop))?;
            return Ok(Next::Skipped);
        };
        // A full batch ends at its last event; the rest of the window waits.
        let end = if events.len() as i64 == MAX_EVENTS {
            (last.tx, last.seq)
        } else {
            end
        };
        let fixed = on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_endpoints SET batch_tx = $2, batch_seq = $3, batch_id = $4, batch_events = $5, batch_since = $6
             WHERE id = $1 AND batch_id IS NULL",
        )
        .bind(&endpoint.id)
        .bind(end.0)
        .bind(end.1)
        .bind(webhook_id)
        .bind(events.len() as i64)
        .bind(events.iter().map(|e| e.at).min().unwrap_or(0))
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))?;
        if fixed == 0 {
            // Another relay fixed a batch first: it is the one to send.
            return Ok(Next::Idle);
        }
        self.with_sequences(endpoint, webhook_id, end, events)
            .await
            .map(Next::Batch)
    }

    /// The endpoint's events in the log after `from` up to `to`: of its
    /// enterprise, of the types (and message) it asked for — the messages'
    /// own, and people's while they are registered (by their ref), never
    /// of messages sent by attributes, whose recipients would reveal those
    /// attributes.
    async fn endpoint_events(
        &self,
        log: &EventLog,
        endpoint: &EndpointRow,
        from: (i64, i64),
        to: (i64, i64),
    ) -> Result<Vec<BatchEvent>> {
        let query = format!(
            "SELECT {tx} AS tx, e.seq, e.kind, e.at, e.channel, e.message_id,
                    COALESCE(r.user_ref, '') AS user_ref, e.detail
             FROM events e
             JOIN messages m ON m.id = e.message_id
             LEFT JOIN registrations r ON r.enterprise_id = m.enterprise_id AND r.user_id = e.user_id
             WHERE {past} AND {upto} AND m.enterprise_id = $6
               AND ((r.user_ref IS NOT NULL AND NOT m.by_attributes) OR e.user_id = '')
               AND ($7 = '' OR e.message_id = $7) AND (($8 >> CAST(e.kind AS INTEGER)) & 1) = 1
             ORDER BY {order} LIMIT $1",
            tx = log.tx,
            past = log.past,
            upto = log.upto,
            order = log.order,
        );
        Ok(on_pool!(self, pool => sqlx::query_as(AssertSqlSafe(query))
            .bind(MAX_EVENTS)
            .bind(from.0)
            .bind(from.1)
            .bind(to.0)
            .bind(to.1)
            .bind(&endpoint.enterprise_id)
            .bind(&endpoint.message_id)
            .bind(endpoint.types)
            .fetch_all(pool)
            .await)?)
    }

    /// `events` as a batch, with each message's next sequence number.
    async fn with_sequences(
        &self,
        endpoint: &EndpointRow,
        webhook_id: &str,
        end: (i64, i64),
        events: Vec<BatchEvent>,
    ) -> Result<Batch> {
        let mut first_sequence: HashMap<String, i64> =
            events.iter().map(|e| (e.message_id.clone(), 1)).collect();
        let messages: Vec<String> = first_sequence.keys().cloned().collect();
        let stored: Vec<(String, i64)> = on_pool!(self, pool => {
            let mut query =
                QueryBuilder::new("SELECT message_id, next FROM webhook_sequences WHERE endpoint_id = ");
            query.push_bind(&endpoint.id).push(" AND message_id IN (");
            let mut list = query.separated(", ");
            for message in &messages {
                list.push_bind(message.as_str());
            }
            query.push(")");
            query.build_query_as().fetch_all(pool).await
        })?;
        first_sequence.extend(stored);
        Ok(Batch {
            webhook_id: webhook_id.to_owned(),
            end,
            events,
            first_sequence,
        })
    }

    /// The endpoint answered 2xx: its cursor moves past the batch, each
    /// message's sequence past its events, and the attempt is logged — in
    /// one transaction, so a crash before it resends the same batch.
    pub async fn webhook_delivered(
        &self,
        endpoint_id: &str,
        batch: &Batch,
        attempt: &Attempt<'_>,
    ) -> Result<()> {
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for event in &batch.events {
            *counts.entry(event.message_id.as_str()).or_default() += 1;
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let moved = sqlx::query(
                "UPDATE webhook_endpoints SET log_tx = $2, log_seq = $3, batch_id = NULL, batch_tx = NULL, batch_seq = NULL,
                        batch_events = NULL, batch_since = NULL,
                        failures = 0, failing_since = NULL, next_attempt_at = $4
                 WHERE id = $1 AND batch_id = $5",
            )
            .bind(endpoint_id)
            .bind(batch.end.0)
            .bind(batch.end.1)
            .bind(attempt.at)
            .bind(&batch.webhook_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 1 && !counts.is_empty() {
                let mut query = QueryBuilder::new("INSERT INTO webhook_sequences (endpoint_id, message_id, next) ");
                query.push_values(&counts, |mut row, (message_id, count)| {
                    let first = batch.first_sequence.get(*message_id).copied().unwrap_or(1);
                    row.push_bind(endpoint_id).push_bind(*message_id).push_bind(first + count);
                });
                query.push(" ON CONFLICT (endpoint_id, message_id) DO UPDATE SET next = excluded.next");
                query.build().execute(&mut *tx).await?;
            }
            tx.log_attempt(endpoint_id, attempt, "delivered").await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The attempt failed: the batch is tried again at `retry_at`, or the
    /// endpoint is disabled (`disable`: why).
    pub async fn webhook_failed(
        &self,
        endpoint_id: &str,
        attempt: &Attempt<'_>,
        retry_at: i64,
        disable: Option<&str>,
    ) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "UPDATE webhook_endpoints SET failures = failures + 1, failing_since = COALESCE(failing_since, $2),
                        next_attempt_at = $3, state = CASE WHEN $4 = '' THEN state ELSE 1 END,
                        disabled_reason = CASE WHEN $4 = '' THEN disabled_reason ELSE $4 END
                 WHERE id = $1",
            )
            .bind(endpoint_id)
            .bind(attempt.at)
            .bind(retry_at)
            .bind(disable.unwrap_or(""))
            .execute(&mut *tx)
            .await?;
            let outcome = if disable.is_some() { "disabled" } else { "failed" };
            tx.log_attempt(endpoint_id, attempt, outcome).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Across enabled endpoints: batches fixed and not yet delivered, the
    /// events in them, and when the oldest of those happened.
    pub async fn webhook_backlog(&self) -> Result<(i64, i64, Option<i64>)> {
        Ok(on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(batch_id), CAST(COALESCE(SUM(batch_events), 0) AS BIGINT), MIN(batch_since)
             FROM webhook_endpoints WHERE state = 0",
        )
        .fetch_one(pool)
        .await)?)
    }
}

transaction_steps! {
    /// What the webhook sender's transactions record beside their update.
    trait WebhookSteps {
        /// Logs an attempt of `endpoint_id` and how it ended.
        async fn log_attempt(&mut self, endpoint_id: &str, attempt: &Attempt<'_>, outcome: &str) -> Result<()> {
            sqlx::query(
                "INSERT INTO webhook_attempts (endpoint_id, webhook_id, at, events, status, outcome, duration_ms, error)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(endpoint_id)
            .bind(attempt.webhook_id)
            .bind(attempt.at)
            .bind(attempt.events)
            .bind(attempt.status)
            .bind(outcome)
            .bind(attempt.duration_ms)
            .bind(attempt.error)
            .execute(&mut *self)
            .await?;
            Ok(())
        }
    }
}
