//! The webhook calls of `EnterpriseApi`: the same use cases as the REST
//! edge's `/v1/webhooks` (`Relay::add_webhook` and the store's reads), in
//! the proto's shapes.

use std::time::Duration;

use chukei_proto::clock::to_timestamp;
use chukei_proto::relay::v1 as pb;

use super::{Relay, required};
use crate::error::{Error, Result};
use crate::storage::webhooks::{AttemptRow, EndpointRow};
use crate::webhooks::EventType;

/// The longest a rotated-out secret may keep signing.
const MAX_OVERLAP: Duration = Duration::from_secs(7 * 86_400);

pub(super) fn webhook_to_wire(row: EndpointRow) -> pb::Webhook {
    pb::Webhook {
        types: EventType::from_bits(row.types)
            .into_iter()
            .map(|t| t.name().to_owned())
            .collect(),
        enabled: row.enabled(),
        failures: row.failures.max(0) as u64,
        next_attempt_at: (row.failures > 0).then(|| to_timestamp(row.next_attempt_at)),
        created_at: Some(to_timestamp(row.created_at)),
        webhook_id: row.id,
        url: row.url,
        message_id: row.message_id,
        disabled_reason: row.disabled_reason,
    }
}

fn attempt_to_wire(row: AttemptRow) -> pb::WebhookAttempt {
    pb::WebhookAttempt {
        at: Some(to_timestamp(row.at)),
        events: row.events.max(0) as u64,
        status: u32::try_from(row.status).unwrap_or(0),
        duration_ms: row.duration_ms.max(0) as u64,
        webhook_id: row.webhook_id,
        outcome: row.outcome,
        error: row.error,
    }
}

pub(super) async fn add(
    relay: &Relay,
    enterprise_id: &str,
    request: pb::AddWebhookRequest,
) -> Result<pb::WebhookWithSecret> {
    let url = required("url", &request.url, 2_000)?;
    let mut types = Vec::new();
    for (index, name) in request.types.iter().enumerate() {
        let event_type = EventType::from_name(name).ok_or_else(|| {
            Error::invalid(
                format!("types[{index}]"),
                "not an event type (recipient.handed_over, .delivered, .opened, .failed, .expired, .unsupported, .skipped; message.accepted, .expanded, .handed_over, .completed)",
            )
        })?;
        types.push(event_type);
    }
    let (row, secret) = relay
        .add_webhook(enterprise_id, url, &types, &request.message_id)
        .await?;
    Ok(pb::WebhookWithSecret {
        webhook: Some(webhook_to_wire(row)),
        secret,
    })
}

pub(super) async fn list(relay: &Relay, enterprise_id: &str) -> Result<pb::ListWebhooksResponse> {
    let rows = relay.store.webhooks(enterprise_id).await?;
    Ok(pb::ListWebhooksResponse {
        webhooks: rows.into_iter().map(webhook_to_wire).collect(),
    })
}

pub(super) async fn rotate(
    relay: &Relay,
    enterprise_id: &str,
    request: pb::RotateWebhookSecretRequest,
) -> Result<pb::WebhookWithSecret> {
    let id = required("webhook_id", &request.webhook_id, 64)?;
    let overlap = match request.previous_valid_for {
        None => Duration::from_secs(86_400),
        Some(d) => {
            let overlap = Duration::try_from(d)
                .map_err(|_| Error::invalid("previous_valid_for", "must not be negative"))?;
            if overlap > MAX_OVERLAP {
                return Err(Error::invalid("previous_valid_for", "at most a week"));
            }
            overlap
        }
    };
    let (row, secret) = relay
        .rotate_webhook_secret(enterprise_id, id, overlap)
        .await?;
    Ok(pb::WebhookWithSecret {
        webhook: Some(webhook_to_wire(row)),
        secret,
    })
}

pub(super) async fn remove(relay: &Relay, enterprise_id: &str, id: &str) -> Result<()> {
    let id = required("webhook_id", id, 64)?;
    relay.remove_webhook(enterprise_id, id).await
}

pub(super) async fn resume(relay: &Relay, enterprise_id: &str, id: &str) -> Result<pb::Webhook> {
    let id = required("webhook_id", id, 64)?;
    let row = relay
        .store
        .resume_webhook(enterprise_id, id, relay.clock.now_ms())
        .await?;
    Ok(webhook_to_wire(row))
}

pub(super) async fn attempts(
    relay: &Relay,
    enterprise_id: &str,
    id: &str,
) -> Result<pb::ListWebhookAttemptsResponse> {
    let id = required("webhook_id", id, 64)?;
    let rows = relay.store.webhook_attempts(enterprise_id, id, 100).await?;
    Ok(pb::ListWebhookAttemptsResponse {
        attempts: rows.into_iter().map(attempt_to_wire).collect(),
    })
}
