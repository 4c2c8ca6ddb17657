//! `webhooks add|list|rotate-secret|remove|replay|attempts`: the status
//! webhook endpoints the relay POSTs each person's events to.

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Subcommand;
use serde_json::json;

use crate::output::rfc3339;
use crate::{Client, Out, explain};

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Add an endpoint; its signing secret is printed this once.
    Add {
        /// https:// (or http://) URL the relay POSTs batches of events to.
        url: String,
        /// Event types (comma-separated), e.g.
        /// recipient.delivered,recipient.opened,message.completed; default:
        /// every type.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Only this message's events.
        #[arg(long)]
        message_id: Option<String>,
    },
    /// Your endpoints and whether each is enabled.
    List,
    /// A new signing secret (printed this once); the old one keeps signing
    /// beside it for --overlap-secs.
    RotateSecret {
        webhook_id: String,
        #[arg(long, default_value_t = 86_400)]
        overlap_secs: u64,
    },
    /// Remove an endpoint.
    Remove { webhook_id: String },
    /// Enable a disabled endpoint again and send everything from where
    /// delivery stopped (nothing is skipped while it is disabled).
    Replay { webhook_id: String },
    /// The endpoint's latest delivery attempts.
    Attempts { webhook_id: String },
}

impl WebhooksCommand {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        match self {
            Self::Add {
                url,
                types,
                message_id,
            } => {
                let added = client
                    .add_webhook(pb::AddWebhookRequest {
                        url: url.clone(),
                        types: types.clone(),
                        message_id: message_id.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_with_secret(&added, json, out)
            }
            Self::List => {
                let list = client
                    .list_webhooks(pb::ListWebhooksRequest {})
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_webhooks(&list.webhooks, json, out)
            }
            Self::RotateSecret {
                webhook_id,
                overlap_secs,
            } => {
                let rotated = client
                    .rotate_webhook_secret(pb::RotateWebhookSecretRequest {
                        webhook_id: webhook_id.clone(),
                        previous_valid_for: Some(prost_types::Duration {
                            seconds: i64::try_from(*overlap_secs).unwrap_or(i64::MAX),
                            nanos: 0,
                        }),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_with_secret(&rotated, json, out)
            }
            Self::Remove { webhook_id } => {
                client
                    .remove_webhook(pb::RemoveWebhookRequest {
                        webhook_id: webhook_id.clone(),
                    })
                    .await
                    .map_err(explain)?;
                if json {
                    writeln!(out, "{}", json!({"removed": webhook_id}))?;
                } else {
                    writeln!(out, "removed {webhook_id}")?;
                }
                Ok(())
            }
            Self::Replay { webhook_id } => {
                let resumed = client
                    .resume_webhook(pb::ResumeWebhookRequest {
                        webhook_id: webhook_id.clone(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_webhooks(&[resumed], json, out)
            }
            Self::Attempts { webhook_id } => {
                let attempts = client
                    .list_webhook_attempts(pb::ListWebhookAttemptsRequest {
                        webhook_id: webhook_id.clone(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_attempts(&attempts.attempts, json, out)
            }
        }
    }
}

fn webhook_json(webhook: &pb::Webhook) -> serde_json::Value {
    json!({
        "webhook_id": webhook.webhook_id,
        "url": webhook.url,
        "types": webhook.types,
        "message_id": webhook.message_id,
        "enabled": webhook.enabled,
        "disabled_reason": webhook.disabled_reason,
        "failures": webhook.failures,
        "next_attempt_at": rfc3339(webhook.next_attempt_at.as_ref()),
        "created_at": rfc3339(webhook.created_at.as_ref()),
    })
}

fn print_with_secret(added: &pb::WebhookWithSecret, json: bool, out: Out<'_>) -> Result<()> {
    let webhook = added.webhook.clone().unwrap_or_default();
    if json {
        let mut value = webhook_json(&webhook);
        value["secret"] = json!(added.secret);
        writeln!(out, "{value}")?;
        return Ok(());
    }
    print_webhooks(&[webhook], false, out)?;
    writeln!(out, "secret      {}", added.secret)?;
    writeln!(
        out,
        "            (shown this once: verify each request's webhook-signature with it)"
    )?;
    Ok(())
}

fn print_webhooks(webhooks: &[pb::Webhook], json: bool, out: Out<'_>) -> Result<()> {
    if json {
        let rows: Vec<_> = webhooks.iter().map(webhook_json).collect();
        writeln!(out, "{}", json!({"webhooks": rows}))?;
        return Ok(());
    }
    for webhook in webhooks {
        let state = if webhook.enabled {
            if webhook.failures > 0 {
                format!(
                    "enabled, retrying ({} failed, next {})",
                    webhook.failures,
                    rfc3339(webhook.next_attempt_at.as_ref())
                )
            } else {
                "enabled".to_owned()
            }
        } else {
            format!("disabled: {}", webhook.disabled_reason)
        };
        writeln!(out, "webhook_id  {}", webhook.webhook_id)?;
        writeln!(out, "url         {}", webhook.url)?;
        writeln!(out, "types       {}", webhook.types.join(","))?;
        if !webhook.message_id.is_empty() {
            writeln!(out, "message_id  {}", webhook.message_id)?;
        }
        writeln!(out, "state       {state}")?;
    }
    Ok(())
}

fn print_attempts(attempts: &[pb::WebhookAttempt], json: bool, out: Out<'_>) -> Result<()> {
    if json {
        let rows: Vec<_> = attempts
            .iter()
            .map(|a| json!({"webhook_id": a.webhook_id, "at": rfc3339(a.at.as_ref()), "events": a.events, "status": a.status, "outcome": a.outcome, "duration_ms": a.duration_ms, "error": a.error}))
            .collect();
        writeln!(out, "{}", json!({"attempts": rows}))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24}  {:<10}  {:>6}  {:>6}  {:>8}  error",
        "at", "outcome", "events", "status", "ms"
    )?;
    for a in attempts {
        let status = if a.status == 0 {
            "-".to_owned()
        } else {
            a.status.to_string()
        };
        writeln!(
            out,
            "{:<24}  {:<10}  {:>6}  {:>6}  {:>8}  {}",
            rfc3339(a.at.as_ref()),
            a.outcome,
            a.events,
            status,
            a.duration_ms,
            a.error
        )?;
    }
    Ok(())
}
