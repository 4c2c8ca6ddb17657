//! Delivering an endpoint's events: taking the endpoint for an attempt,
//! fixing the next batch from the events log past its cursor, and moving
//! the cursor and the per-message sequence numbers once it was answered.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, QueryBuilder};

use super::EndpointRow;
use crate::error::Result;
use crate::storage::fold_log::EventLog;
use crate::storage::{Store, WritePool, on_pool, on_write, transaction_steps};

/// Events in one POST at most.
pub const MAX_EVENTS: i64 = 1_000;
/// Log entries one batch may span (events of other enterprises and types
/// included). Twice a full batch: each event is read about twice when the
/// log is all the endpoint's, and a sparse log is skipped a window at a time.
const WINDOW: i64 = 2 * MAX_EVENTS;

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

impl Store {
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
        let claimed = on_write!(self, pool => sqlx::query(
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
        on_write!(self, pool => sqlx::query("UPDATE webhook_endpoints SET next_attempt_at = $2 WHERE id = $1 AND state = 0")
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
            on_write!(self, pool => sqlx::query(
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
        let fixed = on_write!(self, pool => sqlx::query(
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
        on_write!(self, pool => {
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
        on_write!(self, pool => {
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
