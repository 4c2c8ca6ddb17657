//! The enterprise's command line for the Chukei relay, as a library so the
//! tests can drive it: [`Cli`] is the command line, [`run`] executes it and
//! writes tables (or JSON) to the given writer. Segment syntax lives in
//! [`parse_segment`].
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_client::EnterpriseApiClient;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

/// Send messages through the Chukei relay and follow them.
#[derive(Parser, Debug)]
#[command(name = "enterprise-cli", version, about)]
pub struct Cli {
    /// The relay's gRPC URL.
    #[arg(
        long,
        env = "CHUKEI_RELAY_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub relay_url: String,

    /// Your enterprise API key (shown once when the operator created the enterprise).
    #[arg(long, env = "CHUKEI_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send a message to refs, everyone, a service's users or a segment.
    Send(SendArgs),
    /// A message's state and counts.
    Status {
        message_id: String,
        /// Keep showing progress until every recipient is delivered (or failed).
        #[arg(long)]
        watch: bool,
        /// Between refreshes with --watch (ms).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Your registered users, by ref.
    Registrations {
        /// Only users of this service.
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Follow every page instead of printing the first.
        #[arg(long)]
        all_pages: bool,
    },
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The message text.
    #[arg(long)]
    pub text: String,
    #[arg(long)]
    pub media_url: Option<String>,
    /// rcs, sms, sns or email (default: each carrier's default).
    #[arg(long)]
    pub channel: Option<String>,
    /// Deliver over every carrier a person is contracted with, not only the primary.
    #[arg(long)]
    pub all_carriers: bool,
    /// Makes a retry safe: the same key and message give the same message id (default: fresh).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Everyone registered with you.
    #[arg(long, conflicts_with_all = ["service", "segment", "refs"])]
    pub all: bool,
    /// Everyone registered with this service.
    #[arg(long, conflicts_with_all = ["segment", "refs"])]
    pub service: Option<String>,
    /// An attribute segment, e.g. "gender=f,age=30-39,region=tokyo|osaka,occupation=engineer".
    #[arg(long, conflicts_with = "refs")]
    pub segment: Option<String>,
    /// Specific users, by your refs.
    pub refs: Vec<String>,
}

/// Parses `key=value,…` into a segment; the error names the key.
pub fn parse_segment(text: &str) -> Result<pb::Segment, String> {
    let mut segment = pb::Segment::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("segment: {part:?} is not key=value"))?;
        let value = value.trim();
        match key.trim() {
            "gender" => {
                segment.gender = match value {
                    "f" | "female" => common::Gender::Female,
                    "m" | "male" => common::Gender::Male,
                    "x" | "other" => common::Gender::Other,
                    _ => return Err(format!("segment gender: {value:?} is not f, m or x")),
                } as i32;
            }
            "age" => {
                let bad = || format!("segment age: {value:?} is not N, N-M or Ns (e.g. 30s)");
                let (min, max) = if let Some(decade) = value.strip_suffix('s') {
                    let d: u32 = decade.parse().map_err(|_| bad())?;
                    (d, d + 9)
                } else if let Some((a, b)) = value.split_once('-') {
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
                } else {
                    let n: u32 = value.parse().map_err(|_| bad())?;
                    (n, n)
                };
                if min > max {
                    return Err(format!("segment age: {min} is above {max}"));
                }
                segment.age_min = Some(min);
                segment.age_max = Some(max);
            }
            "region" => segment.regions.extend(value.split('|').map(str::to_owned)),
            "occupation" => segment
                .occupations
                .extend(value.split('|').map(str::to_owned)),
            "service" => segment.service_id = value.to_owned(),
            other => {
                return Err(format!(
                    "segment: unknown key {other:?} (gender, age, region, occupation, service)"
                ));
            }
        }
    }
    Ok(segment)
}

fn parse_channel(text: &str) -> Result<common::Channel, String> {
    match text {
        "rcs" => Ok(common::Channel::Rcs),
        "sms" => Ok(common::Channel::Sms),
        "sns" => Ok(common::Channel::Sns),
        "email" => Ok(common::Channel::Email),
        _ => Err(format!("--channel: {text:?} is not rcs, sms, sns or email")),
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::MessageState::try_from(state) {
        Ok(pb::MessageState::Accepted) => "accepted",
        Ok(pb::MessageState::Expanded) => "expanded",
        Ok(pb::MessageState::HandedOver) => "handed-over",
        _ => "unknown",
    }
}

type Client = EnterpriseApiClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerInterceptor>,
>;

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let key = cli
        .api_key
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--api-key (or CHUKEI_API_KEY) is required"))?;
    let channel = tonic::transport::Endpoint::from_shared(cli.relay_url.clone())
        .map_err(|_| anyhow::anyhow!("--relay-url: not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(EnterpriseApiClient::with_interceptor(
        channel,
        BearerInterceptor::new(key)?,
    ))
}

/// A status error as the user should read it: code and the relay's message.
fn explain(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Builds the `SendMessage` request from the command line.
pub fn send_request(args: &SendArgs) -> anyhow::Result<pb::SendMessageRequest> {
    let kind = if args.all {
        pb::target::Kind::AllRegistered(true)
    } else if let Some(service) = &args.service {
        pb::target::Kind::ServiceId(service.clone())
    } else if let Some(segment) = &args.segment {
        pb::target::Kind::Segment(parse_segment(segment).map_err(anyhow::Error::msg)?)
    } else if !args.refs.is_empty() {
        pb::target::Kind::Refs(pb::RefList {
            refs: args.refs.clone(),
        })
    } else {
        anyhow::bail!("send: give refs, --all, --service or --segment");
    };
    let channel = match &args.channel {
        Some(channel) => parse_channel(channel).map_err(anyhow::Error::msg)? as i32,
        None => 0,
    };
    Ok(pb::SendMessageRequest {
        idempotency_key: args
            .idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        target: Some(pb::Target { kind: Some(kind) }),
        content: Some(common::Content {
            text: args.text.clone(),
            media_url: args.media_url.clone().unwrap_or_default(),
        }),
        channel,
        all_carriers: args.all_carriers,
    })
}

/// Runs the command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut client = connect(&cli).await?;
    match &cli.command {
        Command::Send(args) => {
            let request = send_request(args)?;
            let response = client
                .send_message(request)
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "message_id": response.message_id,
                        "state": state_name(response.state),
                        "matched": response.matched,
                    })
                )?;
            } else {
                writeln!(out, "message_id  {}", response.message_id)?;
                writeln!(out, "state       {}", state_name(response.state))?;
                let matched = response
                    .matched
                    .map_or_else(|| "(being extracted)".to_owned(), |m| m.to_string());
                writeln!(out, "matched     {matched}")?;
            }
        }
        Command::Status {
            message_id,
            watch,
            interval_ms,
        } => loop {
            let status = client
                .get_message(pb::GetMessageRequest {
                    message_id: message_id.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_status(&status, cli.json, out)?;
            let done = status.state == pb::MessageState::HandedOver as i32
                && status.delivered + status.failed >= status.matched;
            if !*watch || done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(*interval_ms)).await;
        },
        Command::Registrations {
            service,
            page_size,
            all_pages,
        } => {
            let mut token = String::new();
            let mut rows = Vec::new();
            loop {
                let page = client
                    .list_registrations(pb::ListRegistrationsRequest {
                        page_size: *page_size,
                        page_token: token.clone(),
                        service_id: service.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                rows.extend(page.registrations);
                token = page.next_page_token;
                if token.is_empty() || !*all_pages {
                    break;
                }
            }
            if cli.json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|r| json!({"user_ref": r.user_ref, "service_id": r.service_id, "registered_at": r.registered_at.as_ref().map(|t| t.seconds)}))
                    .collect();
                writeln!(
                    out,
                    "{}",
                    json!({"registrations": rows, "next_page_token": token})
                )?;
            } else {
                writeln!(
                    out,
                    "{:<28}  {:<40}  registered_at",
                    "user_ref", "service_id"
                )?;
                for r in &rows {
                    let service = if r.service_id.is_empty() {
                        "-"
                    } else {
                        &r.service_id
                    };
                    writeln!(
                        out,
                        "{:<28}  {:<40}  {}",
                        r.user_ref,
                        service,
                        r.registered_at.as_ref().map_or(0, |t| t.seconds)
                    )?;
                }
                if !token.is_empty() {
                    writeln!(out, "(more: --all-pages)")?;
                }
            }
        }
    }
    Ok(())
}

fn print_status(
    status: &pb::MessageStatus,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "message_id": status.message_id,
                "state": state_name(status.state),
                "matched": status.matched,
                "handed_over": status.handed_over,
                "delivered": status.delivered,
                "opened": status.opened,
                "failed": status.failed,
            })
        )?;
    } else {
        let rate = if status.delivered > 0 {
            format!(
                "{:.1}%",
                100.0 * status.opened as f64 / status.delivered as f64
            )
        } else {
            "-".to_owned()
        };
        writeln!(
            out,
            "{:<12} {:>9} {:>12} {:>10} {:>8} {:>7} {:>10}",
            "state", "matched", "handed_over", "delivered", "opened", "failed", "open_rate"
        )?;
        writeln!(
            out,
            "{:<12} {:>9} {:>12} {:>10} {:>8} {:>7} {:>10}",
            state_name(status.state),
            status.matched,
            status.handed_over,
            status.delivered,
            status.opened,
            status.failed,
            rate
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_parse_every_key() {
        let segment = parse_segment(
            "gender=f, age=30s, region=tokyo|osaka, occupation=engineer, service=svc_1",
        )
        .unwrap();
        assert_eq!(segment.gender, common::Gender::Female as i32);
        assert_eq!((segment.age_min, segment.age_max), (Some(30), Some(39)));
        assert_eq!(segment.regions, ["tokyo", "osaka"]);
        assert_eq!(segment.occupations, ["engineer"]);
        assert_eq!(segment.service_id, "svc_1");
        assert_eq!(parse_segment("age=30-34").unwrap().age_max, Some(34));
    }

    #[test]
    fn segment_errors_name_the_key() {
        assert!(parse_segment("gender=q").unwrap_err().contains("gender"));
        assert!(parse_segment("age=old").unwrap_err().contains("age"));
        assert!(parse_segment("age=40-30").unwrap_err().contains("age"));
        assert!(parse_segment("height=180").unwrap_err().contains("height"));
        assert!(parse_segment("tokyo").unwrap_err().contains("key=value"));
    }
}
