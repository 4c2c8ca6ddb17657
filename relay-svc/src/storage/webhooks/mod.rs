//! Status webhooks in SQL: the enterprises' endpoints and the attempts log
//! here; each endpoint's cursor in the events log, the batch it is
//! delivering and the per-message sequence numbers in `delivery.rs`
//! (`crate::webhooks` says what they mean).

mod delivery;

use sqlx::AssertSqlSafe;

pub use delivery::{Attempt, Batch, BatchEvent, MAX_EVENTS, Next};

use super::{Store, WritePool, on_pool, on_write};
use crate::error::{Error, Result};

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
        on_write!(self, pool => {
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
        on_write!(self, pool => {
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
        on_write!(self, pool => sqlx::query(
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
        on_write!(self, pool => sqlx::query(
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
}
