//! `/v1/webhooks`: the enterprise's status webhook endpoints — add one (its
//! signing secret shown once), list, read, rotate the secret, resume a
//! disabled one, read its attempts, remove it. What is sent and how is
//! `crate::webhooks`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use chukei_proto::clock::rfc3339;

use super::{Caller, Core, Problem};
use crate::storage::webhooks::{AttemptRow, EndpointRow};
use crate::webhooks::EventType;

/// A new endpoint.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where events are POSTed: https (or http), no credentials in it.
    pub url: String,
    /// The event types to send; all when absent or empty.
    #[serde(default)]
    pub types: Vec<EventType>,
    /// Only events of this message.
    #[serde(default)]
    pub message_id: Option<String>,
}

/// An endpoint (never its secret).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Webhook {
    pub webhook_id: String,
    pub url: String,
    pub types: Vec<EventType>,
    pub message_id: Option<String>,
    /// enabled, or disabled (then `disabled_reason` says why).
    pub state: String,
    pub disabled_reason: Option<String>,
    /// Failed attempts of the batch being delivered.
    pub failures: u64,
    /// When the next attempt is due, while one is failing.
    pub next_attempt_at: Option<String>,
    pub created_at: Option<String>,
}

impl From<EndpointRow> for Webhook {
    fn from(row: EndpointRow) -> Self {
        Self {
            types: EventType::from_bits(row.types),
            message_id: (!row.message_id.is_empty()).then_some(row.message_id),
            state: if row.state == 0 {
                "enabled"
            } else {
                "disabled"
            }
            .to_owned(),
            disabled_reason: (!row.disabled_reason.is_empty()).then_some(row.disabled_reason),
            failures: row.failures.max(0) as u64,
            next_attempt_at: (row.failures > 0).then(|| rfc3339(row.next_attempt_at)),
            created_at: Some(rfc3339(row.created_at)),
            webhook_id: row.id,
            url: row.url,
        }
    }
}

/// An endpoint with its signing secret, shown only here.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_…`: verify each request's `webhook-signature` with it
    /// (Standard Webhooks). Shown once.
    pub secret: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Webhooks {
    pub webhooks: Vec<Webhook>,
}

/// How long the secret being replaced keeps signing beside the new one.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// Seconds, at most a week; a day when absent.
    #[serde(default)]
    pub previous_valid_for_secs: Option<u64>,
}

/// One delivery attempt.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WebhookAttempt {
    /// The `webhook-id` the request carried (the same on each retry of a batch).
    pub webhook_id: String,
    pub at: Option<String>,
    pub events: u64,
    /// The HTTP status answered (absent: no answer).
    pub status: Option<u16>,
    /// delivered, failed or disabled.
    pub outcome: String,
    pub duration_ms: u64,
    pub error: Option<String>,
}

impl From<AttemptRow> for WebhookAttempt {
    fn from(row: AttemptRow) -> Self {
        Self {
            at: Some(rfc3339(row.at)),
            events: row.events.max(0) as u64,
            status: u16::try_from(row.status).ok().filter(|s| *s > 0),
            duration_ms: row.duration_ms.max(0) as u64,
            error: (!row.error.is_empty()).then_some(row.error),
            webhook_id: row.webhook_id,
            outcome: row.outcome,
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WebhookAttempts {
    /// Newest first, the latest 100.
    pub attempts: Vec<WebhookAttempt>,
}

/// Adds an endpoint; the events that happen from now on are sent to it.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = NewWebhook,
    responses((status = 201, body = WebhookWithSecret),
        (status = 400, description = "A field is invalid", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn add(
    State(core): State<Core>,
    caller: Caller,
    Json(body): Json<NewWebhook>,
) -> Result<(StatusCode, Json<WebhookWithSecret>), Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let message_id = body.message_id.unwrap_or_default();
    let (endpoint, secret) = core
        .relay
        .add_webhook(&enterprise_id, &body.url, &body.types, &message_id)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(WebhookWithSecret {
            webhook: endpoint.into(),
            secret,
        }),
    ))
}

/// The enterprise's endpoints.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", responses((status = 200, body = Webhooks)))]
pub(super) async fn list(
    State(core): State<Core>,
    caller: Caller,
) -> Result<Json<Webhooks>, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let rows = core.relay.store.webhooks(&enterprise_id).await?;
    Ok(Json(Webhooks {
        webhooks: rows.into_iter().map(Webhook::from).collect(),
    }))
}

/// One endpoint.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}", tag = "webhooks",
    params(("webhook_id" = String, Path)), responses((status = 200, body = Webhook)))]
pub(super) async fn get(
    State(core): State<Core>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Webhook>, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let row = core.relay.store.webhook(Some(&enterprise_id), &id).await?;
    Ok(Json(row.into()))
}

/// Removes an endpoint.
#[utoipa::path(delete, path = "/v1/webhooks/{webhook_id}", tag = "webhooks",
    params(("webhook_id" = String, Path)), responses((status = 204, description = "Removed")))]
pub(super) async fn remove(
    State(core): State<Core>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    core.relay.remove_webhook(&enterprise_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new signing secret (shown once); the previous one keeps signing beside
/// it for `previous_valid_for_secs`.
#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/rotate-secret", tag = "webhooks",
    params(("webhook_id" = String, Path)), request_body = Rotation,
    responses((status = 200, body = WebhookWithSecret)))]
pub(super) async fn rotate_secret(
    State(core): State<Core>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<Rotation>,
) -> Result<Json<WebhookWithSecret>, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let secs = body.previous_valid_for_secs.unwrap_or(86_400);
    if secs > 7 * 86_400 {
        return Err(
            crate::error::Error::invalid("previous_valid_for_secs", "at most a week").into(),
        );
    }
    let (endpoint, secret) = core
        .relay
        .rotate_webhook_secret(&enterprise_id, &id, std::time::Duration::from_secs(secs))
        .await?;
    Ok(Json(WebhookWithSecret {
        webhook: endpoint.into(),
        secret,
    }))
}

/// Enables a disabled endpoint again and sends at once from where delivery
/// stopped: the events held back meanwhile follow, nothing is skipped.
#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/resume", tag = "webhooks",
    params(("webhook_id" = String, Path)), responses((status = 200, body = Webhook)))]
pub(super) async fn resume(
    State(core): State<Core>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Webhook>, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let now = core.relay.clock.now_ms();
    let row = core
        .relay
        .store
        .resume_webhook(&enterprise_id, &id, now)
        .await?;
    Ok(Json(row.into()))
}

/// The endpoint's latest delivery attempts.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/attempts", tag = "webhooks",
    params(("webhook_id" = String, Path)), responses((status = 200, body = WebhookAttempts)))]
pub(super) async fn attempts(
    State(core): State<Core>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WebhookAttempts>, Problem> {
    let enterprise_id = core.relay.enterprise_for_key(caller.key()?).await?;
    let rows = core
        .relay
        .store
        .webhook_attempts(&enterprise_id, &id, 100)
        .await?;
    Ok(Json(WebhookAttempts {
        attempts: rows.into_iter().map(WebhookAttempt::from).collect(),
    }))
}
