//! The enterprise's command line for the Chukei relay, as a library so the
//! tests can drive it: [`Cli`] is the command line, [`run`] executes it and
//! writes tables (or JSON) to the given writer. Segment syntax lives in
//! [`parse_segment`].
#![forbid(unsafe_code)]

mod batch;
pub mod operator;

use std::io::Write;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::clock;
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

    /// PEM CA certificates trusted for an https:// --relay-url.
    #[arg(long, env = "CHUKEI_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,

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
    Send(Box<SendArgs>),
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
    /// Why and how a message went (or did not go) to one of your refs.
    Explain {
        message_id: String,
        user_ref: String,
    },
    /// Sent, delivered, opened and open rate (with its 95% interval) of your
    /// messages, grouped by any of: channel, hour, open_hour, weekday, day,
    /// place, gender, age, region, occupation, user.
    Stats {
        /// Dimensions to group by, e.g. channel,hour (none: one total row).
        #[arg(long, value_delimiter = ',')]
        by: Vec<String>,
        /// Sends within this long before --until (e.g. 7d, 12h), or since an
        /// RFC 3339 instant.
        #[arg(long, default_value = "7d")]
        since: String,
        /// Sends before this RFC 3339 instant (default: now).
        #[arg(long)]
        until: Option<String>,
        /// IANA zone for hours, weekdays and days, e.g. Asia/Tokyo.
        #[arg(long, default_value = "UTC")]
        zone: String,
        /// Print CSV instead of a table.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// The prices in force: yen per delivered and per opened message by
    /// channel and local hour.
    Prices,
    /// Your charges for one month, from the billing ledger.
    Billing {
        /// The month, e.g. 2026-11.
        #[arg(long)]
        month: String,
    },
    /// The capacity auction: slots, bids, results.
    #[command(subcommand)]
    Auction(AuctionCommand),
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

impl Command {
    /// The subcommand's name, e.g. `send` (a span name: no arguments in it).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Send(_) => "send",
            Self::Status { .. } => "status",
            Self::Explain { .. } => "explain",
            Self::Stats { .. } => "stats",
            Self::Prices => "prices",
            Self::Billing { .. } => "billing",
            Self::Auction(_) => "auction",
            Self::Registrations { .. } => "registrations",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AuctionCommand {
    /// Slots open for bids, and recently closed ones with their clearing prices.
    Slots,
    /// Place a sealed bid: QUANTITY messages at PRICE yen each.
    Bid {
        slot_id: String,
        #[arg(long)]
        quantity: u64,
        /// Yen per message.
        #[arg(long)]
        price: i64,
    },
    /// Where one of your bids stands (won: its capacity and what is left).
    Status { bid_id: String },
}

#[derive(Args, Clone, Debug)]
pub struct SendArgs {
    /// The message text.
    #[arg(long, required_unless_present = "from_file")]
    pub text: Option<String>,
    /// One message per line of this file, over one stream: CSV with a header
    /// row (columns ref, text, and optionally idempotency_key, subject,
    /// channel) or JSON lines ({"ref": …, "text": …}); the other options are
    /// every line's template. Each line's key defaults to FILE-NAME:LINE, so
    /// sending the file again sends nothing twice.
    #[arg(long, conflicts_with_all = ["all", "service", "segment", "refs", "quote", "idempotency_key"])]
    pub from_file: Option<std::path::PathBuf>,
    /// Where --from-file writes each line's outcome, as JSON lines (default:
    /// FILE.results.jsonl).
    #[arg(long, requires = "from_file")]
    pub results: Option<std::path::PathBuf>,
    #[arg(long)]
    pub media_url: Option<String>,
    /// E-mail subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// An RCS suggested reply (repeat for several).
    #[arg(long = "reply")]
    pub replies: Vec<String>,
    /// rcs, sms, sns or email (default: each carrier's default).
    #[arg(long, conflicts_with = "channels")]
    pub channel: Option<String>,
    /// Channels in order for the policy, e.g. rcs,sms.
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// fixed, most-used, fallback, multi, resend or best (default: fixed).
    #[arg(long)]
    pub policy: Option<String>,
    /// fallback/resend: how long an attempt waits for an open, e.g. 30m, 2h.
    #[arg(long)]
    pub timeout: Option<String>,
    /// resend: at most this many extra sends.
    #[arg(long)]
    pub max_resends: Option<u32>,
    /// resend: keep sending until `opened` (default) or `delivered`.
    #[arg(long)]
    pub resend_until: Option<String>,
    /// A daily local window "18:00-21:00" (with --zone), or an absolute one
    /// "2026-11-27T09:00:00Z/2026-11-27T12:00:00Z".
    #[arg(long)]
    pub window: Option<String>,
    /// IANA zone of a daily window, e.g. Asia/Tokyo.
    #[arg(long, default_value = "UTC")]
    pub zone: String,
    /// Where the window is applied: relay (held before hand-over) or carrier.
    #[arg(long, default_value = "relay")]
    pub window_at: String,
    /// Not delivered within this long after sending: expired, e.g. 2d.
    #[arg(long, conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Not delivered by this instant (RFC 3339): expired.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// A follow-up text sent to each person who opens the message.
    #[arg(long)]
    pub follow_up: Option<String>,
    /// How long after the open the follow-up goes, e.g. 1h.
    #[arg(long, default_value = "0s", requires = "follow_up")]
    pub follow_up_delay: String,
    /// The follow-up's channel (default: the channel opened).
    #[arg(long, requires = "follow_up")]
    pub follow_up_channel: Option<String>,
    /// low, normal or high: low is the first a tired person stops getting.
    #[arg(long)]
    pub priority: Option<String>,
    /// Send each person at the hour of day they open most, within this
    /// horizon (at most 24h), e.g. 24h.
    #[arg(long, conflicts_with_all = ["window", "place_hour_min_rate"])]
    pub best_hour_within: Option<String>,
    /// Only people whose current place opens at least this share (0–1) at some
    /// hour within --place-hour-within, each at the best such hour.
    #[arg(long, conflicts_with = "window")]
    pub place_hour_min_rate: Option<f64>,
    /// The horizon of --place-hour-min-rate (at most 24h).
    #[arg(long, default_value = "24h", requires = "place_hour_min_rate")]
    pub place_hour_within: String,
    /// Deliver over every carrier a person is contracted with, not only the primary.
    #[arg(long)]
    pub all_carriers: bool,
    /// Makes a retry safe: the same key and message give the same message id (default: fresh).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A winning bid id: the message goes in the bid's slot and draws on its capacity.
    #[arg(long)]
    pub bid: Option<String>,
    /// Price the message for its current target instead of sending it.
    #[arg(long)]
    pub quote: bool,
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
                    (d, d.checked_add(9).ok_or_else(bad)?)
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

fn parse_channel(flag: &str, text: &str) -> anyhow::Result<common::Channel> {
    common::Channel::from_short_name(text.trim())
        .ok_or_else(|| anyhow::anyhow!("{flag}: {text:?} is not rcs, sms, sns or email"))
}

fn channel_name(channel: i32) -> &'static str {
    common::Channel::short_name_of(channel)
}

/// "90s", "15m", "2h", "3d" as a protobuf duration; the error names `flag`.
pub fn parse_duration(flag: &str, text: &str) -> anyhow::Result<prost_types::Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| {
        anyhow::anyhow!("{flag}: {text:?} is not a duration like 90s, 15m, 2h or 3d")
    })?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => anyhow::bail!("{flag}: {text:?} needs a unit: s, m, h or d"),
    };
    Ok(prost_types::Duration {
        seconds: number.saturating_mul(unit),
        nanos: 0,
    })
}

fn parse_instant(flag: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let at: jiff::Timestamp = text
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not an RFC 3339 instant"))?;
    Ok(prost_types::Timestamp {
        seconds: at.as_second(),
        nanos: at.subsec_nanosecond(),
    })
}

/// `--window`: "HH:MM-HH:MM" daily in `zone`, or "start/end" instants.
pub fn parse_window(text: &str, zone: &str) -> anyhow::Result<common::DeliveryWindow> {
    let kind = if let Some((start, end)) = text.split_once('/') {
        common::delivery_window::Kind::Absolute(common::AbsoluteWindow {
            start: Some(parse_instant("--window", start)?),
            end: Some(parse_instant("--window", end)?),
        })
    } else {
        let minute = |part: &str| -> anyhow::Result<u32> {
            let bad = || anyhow::anyhow!("--window: {part:?} is not HH:MM");
            let (h, m) = part.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| anyhow::anyhow!("--window: {text:?} is not HH:MM-HH:MM or start/end"))?;
        common::delivery_window::Kind::Daily(common::DailyWindow {
            start_minute: minute(start)?,
            end_minute: minute(end)?,
            time_zone: zone.to_owned(),
        })
    };
    Ok(common::DeliveryWindow { kind: Some(kind) })
}

fn parse_policy(args: &SendArgs) -> anyhow::Result<Option<pb::DeliveryPolicy>> {
    let channels = args
        .channels
        .iter()
        .map(|c| parse_channel("--channels", c).map(|c| c as i32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kind = match args.policy.as_deref() {
        None if channels.is_empty() => return Ok(None),
        None | Some("fixed") => pb::PolicyKind::Fixed,
        Some("most-used") => pb::PolicyKind::MostUsed,
        Some("fallback") => pb::PolicyKind::Fallback,
        Some("multi") => pb::PolicyKind::Multi,
        Some("resend") => pb::PolicyKind::Resend,
        Some("best") => pb::PolicyKind::Best,
        Some(other) => anyhow::bail!(
            "--policy: {other:?} is not fixed, most-used, fallback, multi, resend or best"
        ),
    };
    let channels = match &args.channel {
        Some(channel) if channels.is_empty() => vec![parse_channel("--channel", channel)? as i32],
        _ => channels,
    };
    let resend_until = match args.resend_until.as_deref() {
        None => pb::ResendUntil::Unspecified,
        Some("opened") => pb::ResendUntil::Opened,
        Some("delivered") => pb::ResendUntil::Delivered,
        Some(other) => anyhow::bail!("--resend-until: {other:?} is not opened or delivered"),
    };
    Ok(Some(pb::DeliveryPolicy {
        kind: kind as i32,
        channels,
        timeout: args
            .timeout
            .as_deref()
            .map(|t| parse_duration("--timeout", t))
            .transpose()?,
        max_resends: args.max_resends.unwrap_or(0),
        resend_until: resend_until as i32,
    }))
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

/// A channel to the relay at `relay_url`, trying for up to `wait` while it
/// cannot be reached (a relay still starting); errors name the flag.
pub(crate) async fn relay_channel(
    relay_url: &str,
    tls_ca: Option<&std::path::Path>,
    wait: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let tls = chukei_proto::tls::TlsArgs {
        tls_ca: tls_ca.map(std::path::Path::to_path_buf),
        ..Default::default()
    };
    let endpoint = tls
        .endpoint(relay_url)
        .map_err(|error| anyhow::anyhow!("--relay-url: {error}"))?
        .connect_timeout(Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => anyhow::bail!("--relay-url: cannot connect: {error}"),
        }
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let key = cli
        .api_key
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--api-key (or CHUKEI_API_KEY) is required"))?;
    let channel = relay_channel(&cli.relay_url, cli.tls_ca.as_deref(), Duration::ZERO).await?;
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
    let policy = parse_policy(args)?;
    let channel = match (&args.channel, &policy) {
        (Some(channel), None) => parse_channel("--channel", channel)? as i32,
        _ => 0,
    };
    let window_mode = match args.window_at.as_str() {
        "relay" => pb::WindowMode::HeldAtRelay,
        "carrier" => pb::WindowMode::AtCarrier,
        other => anyhow::bail!("--window-at: {other:?} is not relay or carrier"),
    };
    let expires_at = match (&args.expires_in, &args.expires_at) {
        (Some(within), _) => {
            let within = parse_duration("--expires-in", within)?;
            let now = jiff::Timestamp::now().as_second();
            Some(prost_types::Timestamp {
                seconds: now + within.seconds,
                nanos: 0,
            })
        }
        (None, Some(at)) => Some(parse_instant("--expires-at", at)?),
        (None, None) => None,
    };
    let follow_up = match &args.follow_up {
        None => None,
        Some(text) => Some(pb::FollowUp {
            content: Some(common::Content {
                text: text.clone(),
                ..Default::default()
            }),
            delay: Some(parse_duration("--follow-up-delay", &args.follow_up_delay)?),
            channel: args
                .follow_up_channel
                .as_deref()
                .map(|c| parse_channel("--follow-up-channel", c))
                .transpose()?
                .map_or(0, |c| c as i32),
        }),
    };
    let priority = match args.priority.as_deref() {
        None => pb::Priority::Unspecified,
        Some("low") => pb::Priority::Low,
        Some("normal") => pb::Priority::Normal,
        Some("high") => pb::Priority::High,
        Some(other) => anyhow::bail!("--priority: {other:?} is not low, normal or high"),
    };
    let send_time = match (&args.best_hour_within, args.place_hour_min_rate) {
        (Some(within), _) => Some(pb::send_time::Kind::BestHour(pb::BestHour {
            within: Some(parse_duration("--best-hour-within", within)?),
        })),
        (None, Some(rate)) => Some(pb::send_time::Kind::PlaceHour(pb::PlaceHour {
            min_open_rate: rate,
            within: Some(parse_duration(
                "--place-hour-within",
                &args.place_hour_within,
            )?),
        })),
        (None, None) => None,
    };
    Ok(pb::SendMessageRequest {
        idempotency_key: args
            .idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        target: Some(pb::Target { kind: Some(kind) }),
        content: Some(common::Content {
            text: args.text.clone().unwrap_or_default(),
            media_url: args.media_url.clone().unwrap_or_default(),
            subject: args.subject.clone().unwrap_or_default(),
            suggested_replies: args.replies.clone(),
        }),
        channel,
        all_carriers: args.all_carriers,
        policy,
        window: args
            .window
            .as_deref()
            .map(|w| parse_window(w, &args.zone))
            .transpose()?,
        window_mode: if args.window.is_some() {
            window_mode as i32
        } else {
            0
        },
        expires_at,
        follow_up,
        priority: priority as i32,
        send_time: send_time.map(|kind| pb::SendTime { kind: Some(kind) }),
        bid_id: args.bid.clone().unwrap_or_default(),
    })
}

/// Runs the command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let mut client = connect(&cli).await?;
    match &cli.command {
        Command::Send(args) if args.quote => {
            let quote = client
                .quote_message(send_request(args)?)
                .await
                .map_err(explain)?
                .into_inner();
            print_quote(&quote, cli.json, out)?;
        }
        Command::Send(args) if args.from_file.is_some() => {
            let file = args.from_file.clone().unwrap_or_default();
            batch::send_file(&mut client, args, &file, out).await?;
        }
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
                && status.delivered + status.failed + status.expired + status.skipped
                    >= status.matched;
            if !*watch || done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(*interval_ms)).await;
        },
        Command::Explain {
            message_id,
            user_ref,
        } => {
            let explanation = client
                .explain_delivery(pb::ExplainDeliveryRequest {
                    message_id: message_id.clone(),
                    user_ref: user_ref.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_explanation(&explanation, cli.json, out)?;
        }
        Command::Stats {
            by,
            since,
            until,
            zone,
            csv,
        } => {
            let request = stats_request(by, since, until.as_deref(), zone)?;
            let stats = client
                .get_stats(request)
                .await
                .map_err(explain)?
                .into_inner();
            print_stats(&stats, cli.json, *csv, out)?;
        }
        Command::Prices => {
            let table = client
                .get_prices(pb::GetPricesRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            print_prices(&table, cli.json, out)?;
        }
        Command::Billing { month } => {
            let statement = client
                .get_statement(pb::GetStatementRequest {
                    month: month.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_statement(&statement, cli.json, out)?;
        }
        Command::Auction(AuctionCommand::Slots) => {
            let slots = client
                .list_auction_slots(pb::ListAuctionSlotsRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            print_slots(&slots.slots, cli.json, out)?;
        }
        Command::Auction(AuctionCommand::Bid {
            slot_id,
            quantity,
            price,
        }) => {
            let bid = client
                .place_bid(pb::PlaceBidRequest {
                    slot_id: slot_id.clone(),
                    quantity: *quantity,
                    price: *price,
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_bid(&bid, cli.json, out)?;
        }
        Command::Auction(AuctionCommand::Status { bid_id }) => {
            let bid = client
                .get_bid(pb::GetBidRequest {
                    bid_id: bid_id.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            print_bid(&bid, cli.json, out)?;
        }
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

fn print_quote(quote: &pb::Quote, json: bool, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if json {
        let lines: Vec<_> = quote
            .lines
            .iter()
            .map(|l| json!({"channel": channel_name(l.channel), "slot": l.slot, "delivered_price": l.delivered_price, "opened_price": l.opened_price}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "recipients": quote.recipients,
                "price_table": quote.price_table,
                "zone": quote.zone,
                "lines": lines,
                "delivered": [quote.delivered_low, quote.delivered_high],
                "opened": [quote.opened_low, quote.opened_high],
                "prepaid": quote.prepaid,
            })
        )?;
        return Ok(());
    }
    if quote.price_table == 0 {
        writeln!(out, "recipients  {}", quote.recipients)?;
        writeln!(out, "no rate card is set: nothing is charged")?;
        return Ok(());
    }
    let range = |low: i64, high: i64| {
        if low == high {
            format!("¥{high}")
        } else {
            format!("¥{low}–¥{high}")
        }
    };
    writeln!(out, "recipients      {}", quote.recipients)?;
    writeln!(
        out,
        "price table     v{} ({})",
        quote.price_table, quote.zone
    )?;
    let prepaid = if quote.prepaid {
        " (prepaid by the winning bid)"
    } else {
        ""
    };
    writeln!(
        out,
        "if delivered    {}{prepaid}",
        range(quote.delivered_low, quote.delivered_high)
    )?;
    writeln!(
        out,
        "if all open     {} more",
        range(quote.opened_low, quote.opened_high)
    )?;
    writeln!(
        out,
        "{:<8}  {:>5}  {:>9}  {:>6}",
        "channel", "slot", "delivered", "opened"
    )?;
    for line in &quote.lines {
        writeln!(
            out,
            "{:<8}  {:>02}:00  {:>9}  {:>6}",
            channel_name(line.channel),
            line.slot,
            line.delivered_price,
            line.opened_price
        )?;
    }
    Ok(())
}

fn print_prices(
    table: &pb::PriceTable,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let cells: Vec<_> = table
            .cells
            .iter()
            .map(|c| json!({"channel": channel_name(c.channel), "slot": c.slot, "delivered_price": c.delivered_price, "opened_price": c.opened_price, "base_delivered_price": c.base_delivered_price, "base_opened_price": c.base_opened_price, "open_rate": c.open_rate}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"version": table.version, "zone": table.zone, "dynamic": table.dynamic, "cells": cells})
        )?;
        return Ok(());
    }
    if table.version == 0 {
        writeln!(out, "no rate card is set: nothing is charged")?;
        return Ok(());
    }
    let kind = if table.dynamic { "dynamic" } else { "fixed" };
    writeln!(
        out,
        "price table v{} ({kind}), hours in {}; yen delivered/opened",
        table.version, table.zone
    )?;
    write!(out, "{:<6}", "hour")?;
    let channels = ["rcs", "sms", "sns", "email"];
    for channel in channels {
        write!(out, "  {channel:>11}")?;
    }
    writeln!(out)?;
    for slot in 0..24 {
        write!(out, "{slot:02}:00 ")?;
        for channel in channels {
            let cell = table
                .cells
                .iter()
                .find(|c| c.slot == slot && channel_name(c.channel) == channel);
            let text = cell.map_or_else(
                || "-".to_owned(),
                |c| format!("{}/{}", c.delivered_price, c.opened_price),
            );
            write!(out, "  {text:>11}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn print_statement(
    statement: &pb::Statement,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let lines: Vec<_> = statement
            .lines
            .iter()
            .map(|l| json!({"kind": l.kind, "channel": channel_name(l.channel), "slot": l.slot, "quantity": l.quantity, "unit_price": l.unit_price, "amount": l.amount}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"month": statement.month, "zone": statement.zone, "lines": lines, "total": statement.total})
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "statement {} ({}), yen",
        statement.month, statement.zone
    )?;
    writeln!(
        out,
        "{:<10}  {:<7}  {:>5}  {:>9}  {:>6}  {:>10}",
        "kind", "channel", "slot", "quantity", "price", "amount"
    )?;
    for line in &statement.lines {
        let slot = line
            .slot
            .map_or_else(|| "-".to_owned(), |s| format!("{s:02}:00"));
        writeln!(
            out,
            "{:<10}  {:<7}  {:>5}  {:>9}  {:>6}  {:>10}",
            line.kind,
            channel_name(line.channel),
            slot,
            line.quantity,
            line.unit_price,
            line.amount
        )?;
    }
    writeln!(out, "{:<51}  {:>10}", "total", statement.total)?;
    Ok(())
}

fn rule_name(rule: i32) -> &'static str {
    match pb::PricingRule::try_from(rule) {
        Ok(pb::PricingRule::PayAsBid) => "pay-as-bid",
        Ok(pb::PricingRule::Uniform) => "uniform",
        _ => "-",
    }
}

fn print_slots(
    slots: &[pb::AuctionSlot],
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let rows: Vec<_> = slots
            .iter()
            .map(|s| json!({"slot_id": s.slot_id, "channel": channel_name(s.channel), "starts_at": rfc3339(s.starts_at.as_ref()), "ends_at": rfc3339(s.ends_at.as_ref()), "capacity": s.capacity, "closes_at": rfc3339(s.closes_at.as_ref()), "reserve_price": s.reserve_price, "rule": rule_name(s.rule), "closed": s.closed, "awarded": s.awarded, "clearing_price": s.clearing_price}))
            .collect();
        writeln!(out, "{}", json!({"slots": rows}))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40}  {:<7}  {:<20}  {:<20}  {:>8}  {:<20}  {:>7}  {:<10}  result",
        "slot_id", "channel", "starts_at", "ends_at", "capacity", "closes_at", "reserve", "rule"
    )?;
    for slot in slots {
        let result = match (slot.closed, slot.clearing_price) {
            (false, _) => "open for bids".to_owned(),
            (true, Some(price)) => format!("{} awarded at ¥{price}", slot.awarded),
            (true, None) => "closed, nothing awarded".to_owned(),
        };
        writeln!(
            out,
            "{:<40}  {:<7}  {:<20}  {:<20}  {:>8}  {:<20}  {:>7}  {:<10}  {result}",
            slot.slot_id,
            channel_name(slot.channel),
            rfc3339(slot.starts_at.as_ref()),
            rfc3339(slot.ends_at.as_ref()),
            slot.capacity,
            rfc3339(slot.closes_at.as_ref()),
            slot.reserve_price,
            rule_name(slot.rule),
        )?;
    }
    Ok(())
}

fn print_bid(bid: &pb::Bid, json: bool, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let state = match pb::BidState::try_from(bid.state) {
        Ok(pb::BidState::Sealed) => "sealed",
        Ok(pb::BidState::Won) => "won",
        Ok(pb::BidState::Lost) => "lost",
        _ => "-",
    };
    if json {
        writeln!(
            out,
            "{}",
            json!({"bid_id": bid.bid_id, "slot_id": bid.slot_id, "quantity": bid.quantity, "price": bid.price, "state": state, "awarded": bid.awarded, "pays": bid.pays, "used": bid.used, "channel": channel_name(bid.channel), "starts_at": rfc3339(bid.starts_at.as_ref()), "ends_at": rfc3339(bid.ends_at.as_ref())})
        )?;
        return Ok(());
    }
    writeln!(out, "bid_id      {}", bid.bid_id)?;
    writeln!(out, "slot_id     {}", bid.slot_id)?;
    writeln!(
        out,
        "bid         {} messages at ¥{}",
        bid.quantity, bid.price
    )?;
    writeln!(out, "state       {state}")?;
    if state == "won" {
        writeln!(
            out,
            "awarded     {} messages at ¥{} each",
            bid.awarded, bid.pays
        )?;
        writeln!(out, "left        {}", bid.awarded.saturating_sub(bid.used))?;
        writeln!(
            out,
            "send        {} from {} to {} with --bid {}",
            channel_name(bid.channel),
            rfc3339(bid.starts_at.as_ref()),
            rfc3339(bid.ends_at.as_ref()),
            bid.bid_id
        )?;
    }
    Ok(())
}

/// The `stats` flags as a request; errors name the flag.
pub fn stats_request(
    by: &[String],
    since: &str,
    until: Option<&str>,
    zone: &str,
) -> anyhow::Result<pb::GetStatsRequest> {
    let by = by
        .iter()
        .map(|name| {
            let name = name.trim();
            STATS_DIMENSIONS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| *d as i32)
                .ok_or_else(|| {
                    let known: Vec<&str> = STATS_DIMENSIONS.iter().map(|(n, _)| *n).collect();
                    anyhow::anyhow!("--by: {name:?} is not one of {}", known.join(", "))
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (since, lookback) = if since.contains('T') {
        (Some(parse_instant("--since", since)?), None)
    } else {
        (None, Some(parse_duration("--since", since)?))
    };
    Ok(pb::GetStatsRequest {
        by,
        since,
        until: until.map(|u| parse_instant("--until", u)).transpose()?,
        zone: zone.to_owned(),
        lookback,
    })
}

/// `--by` names, as the relay names its columns.
const STATS_DIMENSIONS: [(&str, pb::StatsDimension); 11] = [
    ("channel", pb::StatsDimension::Channel),
    ("hour", pb::StatsDimension::SendHour),
    ("open_hour", pb::StatsDimension::OpenHour),
    ("weekday", pb::StatsDimension::Weekday),
    ("day", pb::StatsDimension::Day),
    ("place", pb::StatsDimension::Place),
    ("gender", pb::StatsDimension::Gender),
    ("age", pb::StatsDimension::Age),
    ("region", pb::StatsDimension::Region),
    ("occupation", pb::StatsDimension::Occupation),
    ("user", pb::StatsDimension::User),
];

fn print_stats(
    stats: &pb::GetStatsResponse,
    json: bool,
    csv: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let rate = |row: &pb::StatsRow| row.open_rate.unwrap_or_default();
    if json {
        let rows: Vec<_> = stats
            .rows
            .iter()
            .map(|row| {
                let key: serde_json::Map<String, serde_json::Value> = stats
                    .columns
                    .iter()
                    .cloned()
                    .zip(row.key.iter().map(|k| json!(k)))
                    .collect();
                json!({
                    "key": key,
                    "sent": row.sent,
                    "delivered": row.delivered,
                    "opened": row.opened,
                    "open_rate": row.open_rate.map(|r| json!({"rate": r.rate, "low": r.low, "high": r.high})),
                    "low_sample": row.low_sample,
                    "suppressed": row.suppressed,
                })
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"rows": rows, "min_cohort": stats.min_cohort, "min_sample": stats.min_sample})
        )?;
        return Ok(());
    }
    if csv {
        let mut header = stats.columns.clone();
        header.extend(
            [
                "sent",
                "delivered",
                "opened",
                "open_rate",
                "low",
                "high",
                "low_sample",
                "suppressed",
            ]
            .map(String::from),
        );
        writeln!(out, "{}", header.join(","))?;
        for row in &stats.rows {
            let mut fields: Vec<String> = row.key.iter().map(|k| csv_field(k)).collect();
            fields.extend([
                row.sent.to_string(),
                row.delivered.to_string(),
                row.opened.to_string(),
            ]);
            match row.open_rate {
                Some(r) => fields.extend([r.rate, r.low, r.high].map(|v| format!("{v:.4}"))),
                None => fields.extend(["", "", ""].map(String::from)),
            }
            fields.extend([row.low_sample.to_string(), row.suppressed.to_string()]);
            writeln!(out, "{}", fields.join(","))?;
        }
        return Ok(());
    }
    let widths: Vec<usize> = stats
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            stats
                .rows
                .iter()
                .map(|r| r.key.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let mut line = String::new();
    for (column, width) in stats.columns.iter().zip(&widths) {
        line.push_str(&format!("{column:<width$}  "));
    }
    writeln!(
        out,
        "{line}{:>9} {:>10} {:>8} {:>9}  95% interval",
        "sent", "delivered", "opened", "open_rate"
    )?;
    for row in &stats.rows {
        let mut line = String::new();
        for (value, width) in row.key.iter().zip(&widths) {
            line.push_str(&format!("{value:<width$}  "));
        }
        if row.suppressed {
            writeln!(
                out,
                "{line}{:>9} {:>10} {:>8} {:>9}  (fewer than {} people-messages: withheld)",
                "-", "-", "-", "-", stats.min_cohort
            )?;
            continue;
        }
        let (shown, interval) = match row.open_rate {
            Some(_) => {
                let r = rate(row);
                (
                    format!("{:.1}%", 100.0 * r.rate),
                    format!(
                        "{:.1}–{:.1}%{}",
                        100.0 * r.low,
                        100.0 * r.high,
                        if row.low_sample {
                            "  (small sample)"
                        } else {
                            ""
                        }
                    ),
                )
            }
            None => ("-".to_owned(), "(nothing delivered)".to_owned()),
        };
        writeln!(
            out,
            "{line}{:>9} {:>10} {:>8} {:>9}  {interval}",
            row.sent, row.delivered, row.opened, shown
        )?;
    }
    Ok(())
}

/// A CSV field, quoted when it must be.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
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
                "expired": status.expired,
                "unsupported": status.unsupported,
                "deferred": status.deferred,
                "skipped": status.skipped,
                "plan": status.plan,
                "follow_up_message_id": status.follow_up_message_id,
                "charged": status.charged,
                "backlog": status.backlog,
                "expected_drain_secs": status.expected_drain.as_ref().map(|d| d.seconds),
            })
        )?;
    } else {
        writeln!(out, "plan: {}", status.plan)?;
        if !status.follow_up_message_id.is_empty() {
            writeln!(out, "follow-up message: {}", status.follow_up_message_id)?;
        }
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
        if status.expired + status.unsupported + status.deferred + status.skipped > 0 {
            writeln!(
                out,
                "expired {}  unsupported {}  deferred {}  skipped {}",
                status.expired, status.unsupported, status.deferred, status.skipped
            )?;
        }
        if status.backlog > 0 {
            let drain = status
                .expected_drain
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |d| format!("~{}s", d.seconds));
            writeln!(out, "backlog {} (drains in {drain})", status.backlog)?;
        }
        writeln!(out, "charged so far: ¥{}", status.charged)?;
    }
    Ok(())
}

fn rfc3339(at: Option<&prost_types::Timestamp>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |t| clock::rfc3339(clock::from_timestamp(t)),
    )
}

fn print_explanation(
    explanation: &pb::DeliveryExplanation,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let attempts: Vec<_> = explanation
            .attempts
            .iter()
            .map(|a| {
                json!({
                    "attempt": a.attempt,
                    "channel": channel_name(a.channel),
                    "state": a.state,
                    "not_before": rfc3339(a.not_before.as_ref()),
                    "handed_over_at": a.handed_over_at.as_ref().map(|t| rfc3339(Some(t))),
                    "reason": a.reason,
                })
            })
            .collect();
        let events: Vec<_> = explanation
            .events
            .iter()
            .map(|e| json!({"kind": e.kind, "at": rfc3339(e.at.as_ref()), "channel": channel_name(e.channel)}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"message_id": explanation.message_id, "plan": explanation.plan, "attempts": attempts, "events": events})
        )?;
        return Ok(());
    }
    writeln!(out, "plan: {}", explanation.plan)?;
    writeln!(out, "attempts:")?;
    for a in &explanation.attempts {
        writeln!(
            out,
            "  #{} {:<7} {:<12} not before {}  handed over {}",
            a.attempt,
            channel_name(a.channel),
            a.state,
            rfc3339(a.not_before.as_ref()),
            rfc3339(a.handed_over_at.as_ref()),
        )?;
        writeln!(out, "     {}", a.reason)?;
    }
    writeln!(out, "events:")?;
    for e in &explanation.events {
        writeln!(
            out,
            "  {:<12} {}  {}",
            e.kind,
            rfc3339(e.at.as_ref()),
            channel_name(e.channel)
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
    fn windows_durations_and_policies_parse() {
        let daily = parse_window("18:00-21:30", "Asia/Tokyo").unwrap();
        let Some(common::delivery_window::Kind::Daily(daily)) = daily.kind else {
            panic!("not daily")
        };
        assert_eq!((daily.start_minute, daily.end_minute), (1080, 1290));
        assert_eq!(daily.time_zone, "Asia/Tokyo");
        assert!(parse_window("2026-11-27T09:00:00Z/2026-11-27T12:00:00Z", "UTC").is_ok());
        assert!(
            parse_window("25:00-26:00", "UTC")
                .unwrap_err()
                .to_string()
                .contains("--window")
        );
        assert_eq!(parse_duration("--timeout", "2h").unwrap().seconds, 7200);
        assert!(
            parse_duration("--timeout", "2")
                .unwrap_err()
                .to_string()
                .contains("unit")
        );
        let args = Cli::parse_from([
            "enterprise-cli",
            "send",
            "--text",
            "t",
            "--all",
            "--policy",
            "fallback",
            "--channels",
            "rcs,sms",
            "--timeout",
            "30m",
        ]);
        let Command::Send(args) = args.command else {
            panic!()
        };
        let request = send_request(&args).unwrap();
        let policy = request.policy.unwrap();
        assert_eq!(policy.kind, pb::PolicyKind::Fallback as i32);
        assert_eq!(
            policy.channels,
            [common::Channel::Rcs as i32, common::Channel::Sms as i32]
        );
        assert_eq!(policy.timeout.unwrap().seconds, 1800);
        assert_eq!(request.channel, 0);
    }

    #[test]
    fn segment_errors_name_the_key() {
        assert!(parse_segment("gender=q").unwrap_err().contains("gender"));
        assert!(parse_segment("age=old").unwrap_err().contains("age"));
        assert!(parse_segment("age=40-30").unwrap_err().contains("age"));
        assert!(parse_segment("height=180").unwrap_err().contains("height"));
        assert!(parse_segment("tokyo").unwrap_err().contains("key=value"));
    }

    proptest::proptest! {
        /// Any text: a segment or an error naming the segment, never a panic;
        /// a parsed age range is never upside down.
        #[test]
        fn any_segment_text_parses_or_is_refused(
            text in "((gender|age|region|occupation|service|x)=(\\PC|[0-9]{1,12}s?|-|\\|){0,12},?){0,6}",
        ) {
            match parse_segment(&text) {
                Ok(segment) => {
                    if let (Some(min), Some(max)) = (segment.age_min, segment.age_max) {
                        proptest::prop_assert!(min <= max);
                    }
                }
                Err(error) => proptest::prop_assert!(error.starts_with("segment"), "{error}"),
            }
        }
    }
}
