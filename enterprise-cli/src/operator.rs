//! `chukei-admin`: the hub operator's command line over the relay's `Admin`
//! service — create enterprises and services, register carriers, set the rate
//! card, look at carriers. Deployments use it to bootstrap a hub (the compose
//! file's `bootstrap` service, the Kubernetes bootstrap Job); operators use it
//! by hand. Creating with a chosen id and `--exists-ok` makes a bootstrap safe
//! to run again.

use std::io::Write;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::admin_client::AdminClient;
use clap::{Parser, Subcommand};
use serde_json::json;

/// Operate the Chukei relay: tenants, carriers, prices.
#[derive(Parser, Debug)]
#[command(name = "chukei-admin", version, about)]
pub struct AdminCli {
    /// The relay's gRPC URL.
    #[arg(
        long,
        env = "CHUKEI_RELAY_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub relay_url: String,

    /// PEM CA certificates trusted for an https:// --relay-url.
    #[arg(long, env = "CHUKEI_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,

    /// The relay's admin token (the relay's --admin-token).
    #[arg(
        long,
        env = "CHUKEI_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,

    /// Keep trying to reach the relay for this long before giving up (seconds).
    #[arg(
        long,
        env = "CHUKEI_ADMIN_CONNECT_WAIT_SECS",
        default_value_t = 5,
        global = true
    )]
    pub connect_wait_secs: u64,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an enterprise; prints its id and its API key (shown only once).
    CreateEnterprise {
        #[arg(long)]
        name: String,
        /// Choose the id (lowercase a-z, 0-9, '-', '_') instead of a generated one.
        #[arg(long)]
        id: Option<String>,
        /// An enterprise with this --id already existing is not an error.
        #[arg(long, requires = "id")]
        exists_ok: bool,
    },
    /// Create one of an enterprise's services.
    CreateService {
        #[arg(long)]
        enterprise: String,
        #[arg(long)]
        name: String,
        /// Choose the id instead of a generated one.
        #[arg(long)]
        id: Option<String>,
        /// A service with this --id already existing is not an error.
        #[arg(long, requires = "id")]
        exists_ok: bool,
    },
    /// Register a carrier (or change its endpoint and token).
    RegisterCarrier {
        /// The carrier's id, e.g. aozora.
        #[arg(long)]
        id: String,
        /// Where the relay dials the carrier, e.g. http://carrier-aozora:50061.
        #[arg(long)]
        endpoint: String,
        /// The secret the carrier presents to the relay (its CHUKEI_CARRIER_TOKEN).
        #[arg(long, env = "CHUKEI_CARRIER_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Set the rate card: every channel at every local hour priced once.
    RateCard {
        /// CHANNEL:FROM-TO:DELIVERED:OPENED, yen, local hours [FROM, TO)
        /// wrapping midnight (0-0 is all day), e.g. sms:8-18:3:2. Repeat.
        #[arg(long = "entry", required = true)]
        entries: Vec<String>,
        /// IANA zone of the hours (default: the relay's billing zone).
        #[arg(long)]
        zone: Option<String>,
        /// Dynamic pricing FLOOR%:CEILING%:MIN_DELIVERIES, e.g. 50:200:100.
        #[arg(long)]
        dynamic: Option<String>,
    },
    /// Each carrier: connected, pending, handed over, delivered, opened.
    Carriers {
        /// Only this message (default: all).
        #[arg(long)]
        message: Option<String>,
    },
    /// Issue a new API key for an enterprise (shown only once).
    IssueKey {
        #[arg(long)]
        enterprise: String,
        /// Rotation: the enterprise's other keys stop working this many
        /// seconds from now (default: they stay until revoked).
        #[arg(long)]
        overlap_secs: Option<u32>,
    },
    /// Revoke one of an enterprise's API keys at once.
    RevokeKey {
        #[arg(long)]
        enterprise: String,
        /// The key's id, as `keys` lists it.
        #[arg(long)]
        key_id: String,
    },
    /// An enterprise's API keys (ids and validity, never the keys).
    Keys {
        #[arg(long)]
        enterprise: String,
    },
    /// Verify the audit log's hash chain; exits non-zero at a broken link.
    VerifyAudit,
    /// The latest audit log entries, newest first.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// Parses `CHANNEL:FROM-TO:DELIVERED:OPENED`; the error names the flag.
pub fn parse_rate_entry(text: &str) -> anyhow::Result<pb::RateCardEntry> {
    let bad = || anyhow::anyhow!("--entry: {text:?} is not CHANNEL:FROM-TO:DELIVERED:OPENED");
    let parts: Vec<&str> = text.split(':').collect();
    let [channel, hours, delivered, opened] = parts[..] else {
        return Err(bad());
    };
    let channel = common::Channel::from_short_name(channel)
        .ok_or_else(|| anyhow::anyhow!("--entry: {channel:?} is not rcs, sms, sns or email"))?;
    let (from, to) = hours.split_once('-').ok_or_else(bad)?;
    Ok(pb::RateCardEntry {
        channel: channel as i32,
        from_hour: from.parse().map_err(|_| bad())?,
        to_hour: to.parse().map_err(|_| bad())?,
        delivered_price: delivered.parse().map_err(|_| bad())?,
        opened_price: opened.parse().map_err(|_| bad())?,
    })
}

fn parse_dynamic(text: &str) -> anyhow::Result<pb::DynamicPricing> {
    let bad = || anyhow::anyhow!("--dynamic: {text:?} is not FLOOR%:CEILING%:MIN_DELIVERIES");
    let parts: Vec<&str> = text.split(':').collect();
    let [floor, ceiling, min] = parts[..] else {
        return Err(bad());
    };
    Ok(pb::DynamicPricing {
        floor_percent: floor.parse().map_err(|_| bad())?,
        ceiling_percent: ceiling.parse().map_err(|_| bad())?,
        min_deliveries: min.parse().map_err(|_| bad())?,
    })
}

type Client = AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerInterceptor>,
>;

async fn connect(cli: &AdminCli) -> anyhow::Result<Client> {
    let token = cli
        .admin_token
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--admin-token (or CHUKEI_ADMIN_TOKEN) is required"))?;
    let channel = crate::relay_channel(
        &cli.relay_url,
        cli.tls_ca.as_deref(),
        Duration::from_secs(cli.connect_wait_secs),
    )
    .await?;
    Ok(AdminClient::with_interceptor(
        channel,
        BearerInterceptor::new(token)?,
    ))
}

fn explain(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// `Ok(None)` when the call found the object already there and that is allowed.
fn allow_existing<T>(
    result: Result<tonic::Response<T>, tonic::Status>,
    exists_ok: bool,
) -> anyhow::Result<Option<T>> {
    match result {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) if exists_ok && status.code() == tonic::Code::AlreadyExists => Ok(None),
        Err(status) => Err(explain(status)),
    }
}

/// Runs one operator command, writing its result to `out`.
pub async fn run(cli: AdminCli, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = connect(&cli).await?;
    match cli.command {
        AdminCommand::CreateEnterprise {
            name,
            id,
            exists_ok,
        } => {
            let request = pb::CreateEnterpriseRequest {
                name,
                enterprise_id: id.clone().unwrap_or_default(),
            };
            match allow_existing(client.create_enterprise(request).await, exists_ok)? {
                Some(created) if cli.json => writeln!(
                    out,
                    "{}",
                    json!({"enterprise_id": created.enterprise_id, "api_key": created.api_key, "created": true})
                )?,
                Some(created) => writeln!(
                    out,
                    "enterprise_id\t{}\napi_key\t{}",
                    created.enterprise_id, created.api_key
                )?,
                None => existing(out, cli.json, "enterprise_id", id.as_deref())?,
            }
        }
        AdminCommand::CreateService {
            enterprise,
            name,
            id,
            exists_ok,
        } => {
            let request = pb::CreateServiceRequest {
                enterprise_id: enterprise,
                name,
                service_id: id.clone().unwrap_or_default(),
            };
            match allow_existing(client.create_service(request).await, exists_ok)? {
                Some(created) if cli.json => writeln!(
                    out,
                    "{}",
                    json!({"service_id": created.service_id, "created": true})
                )?,
                Some(created) => writeln!(out, "service_id\t{}", created.service_id)?,
                None => existing(out, cli.json, "service_id", id.as_deref())?,
            }
        }
        AdminCommand::RegisterCarrier {
            id,
            endpoint,
            token,
        } => {
            client
                .register_carrier(pb::RegisterCarrierRequest {
                    carrier_id: id.clone(),
                    endpoint,
                    token,
                })
                .await
                .map_err(explain)?;
            if cli.json {
                writeln!(out, "{}", json!({"carrier_id": id, "registered": true}))?;
            } else {
                writeln!(out, "carrier {id} registered")?;
            }
        }
        AdminCommand::RateCard {
            entries,
            zone,
            dynamic,
        } => {
            let table = client
                .set_rate_card(pb::SetRateCardRequest {
                    entries: entries
                        .iter()
                        .map(|entry| parse_rate_entry(entry))
                        .collect::<anyhow::Result<_>>()?,
                    zone: zone.unwrap_or_default(),
                    dynamic: dynamic.as_deref().map(parse_dynamic).transpose()?,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"version": table.version, "zone": table.zone, "cells": table.cells.len()})
                )?;
            } else {
                writeln!(
                    out,
                    "price table version {} in force ({}, {} cells)",
                    table.version,
                    table.zone,
                    table.cells.len()
                )?;
            }
        }
        AdminCommand::Carriers { message } => {
            let carriers = client
                .get_carrier_stats(pb::GetCarrierStatsRequest {
                    message_id: message.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .carriers;
            if cli.json {
                let rows: Vec<_> = carriers
                    .iter()
                    .map(|c| {
                        json!({
                            "carrier_id": c.carrier_id, "connected": c.connected,
                            "pending": c.pending, "handed_over": c.handed_over,
                            "delivered": c.delivered, "opened": c.opened,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            } else {
                writeln!(
                    out,
                    "{:<16} {:>9} {:>10} {:>11} {:>10} {:>10}",
                    "carrier", "connected", "pending", "handed-over", "delivered", "opened"
                )?;
                for c in carriers {
                    writeln!(
                        out,
                        "{:<16} {:>9} {:>10} {:>11} {:>10} {:>10}",
                        c.carrier_id, c.connected, c.pending, c.handed_over, c.delivered, c.opened
                    )?;
                }
            }
        }
        AdminCommand::IssueKey {
            enterprise,
            overlap_secs,
        } => {
            let issued = client
                .issue_api_key(pb::IssueApiKeyRequest {
                    enterprise_id: enterprise,
                    overlap: overlap_secs.map(|secs| prost_types::Duration {
                        seconds: i64::from(secs),
                        nanos: 0,
                    }),
                })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"key_id": issued.key_id, "api_key": issued.api_key})
                )?;
            } else {
                writeln!(
                    out,
                    "key_id\t{}\napi_key\t{}",
                    issued.key_id, issued.api_key
                )?;
            }
        }
        AdminCommand::RevokeKey { enterprise, key_id } => {
            client
                .revoke_api_key(pb::RevokeApiKeyRequest {
                    enterprise_id: enterprise,
                    key_id: key_id.clone(),
                })
                .await
                .map_err(explain)?;
            writeln!(out, "key {key_id} revoked")?;
        }
        AdminCommand::Keys { enterprise } => {
            let keys = client
                .list_api_keys(pb::ListApiKeysRequest {
                    enterprise_id: enterprise,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .keys;
            let at = |t: &Option<prost_types::Timestamp>| {
                t.as_ref().map_or("-".to_owned(), |t| t.to_string())
            };
            for key in keys {
                writeln!(
                    out,
                    "{}\tcreated {}\texpires {}\trevoked {}",
                    key.key_id,
                    at(&key.created_at),
                    at(&key.expires_at),
                    at(&key.revoked_at)
                )?;
            }
        }
        AdminCommand::VerifyAudit => {
            let verified = client
                .verify_audit_log(pb::VerifyAuditLogRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"entries": verified.entries, "intact": verified.intact,
                           "first_broken_seq": verified.first_broken_seq, "reason": verified.reason})
                )?;
            } else if verified.intact {
                writeln!(out, "audit log intact: {} entries", verified.entries)?;
            }
            if !verified.intact {
                anyhow::bail!(
                    "audit log broken at entry {}: {} ({} entries verified before it)",
                    verified.first_broken_seq,
                    verified.reason,
                    verified.entries
                );
            }
        }
        AdminCommand::Audit { limit } => {
            let entries = client
                .list_audit_log(pb::ListAuditLogRequest { limit })
                .await
                .map_err(explain)?
                .into_inner()
                .entries;
            for entry in entries {
                let at = entry.at.map(|t| t.to_string()).unwrap_or_default();
                writeln!(
                    out,
                    "{}\t{at}\t{}\t{}\t{}\t{}",
                    entry.seq, entry.actor, entry.action, entry.subject, entry.detail
                )?;
            }
        }
    }
    Ok(())
}

fn existing(out: &mut impl Write, json: bool, field: &str, id: Option<&str>) -> anyhow::Result<()> {
    let id = id.unwrap_or_default();
    if json {
        writeln!(out, "{}", json!({field: id, "created": false}))?;
    } else {
        writeln!(out, "{field}\t{id}\t(already existed)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_entries_parse_and_name_the_flag() {
        let entry = parse_rate_entry("sms:18-8:4:2").unwrap();
        assert_eq!(entry.channel, common::Channel::Sms as i32);
        assert_eq!((entry.from_hour, entry.to_hour), (18, 8));
        assert_eq!((entry.delivered_price, entry.opened_price), (4, 2));
        for bad in [
            "sms:8-18:3",
            "fax:0-0:1:1",
            "sms:8:3:2",
            "sms:a-b:1:1",
            "sms:0-0:x:1",
        ] {
            let error = parse_rate_entry(bad).unwrap_err().to_string();
            assert!(error.starts_with("--entry:"), "{bad}: {error}");
        }
        assert_eq!(parse_dynamic("50:200:100").unwrap().ceiling_percent, 200);
        assert!(parse_dynamic("50:200").is_err());
    }
}
