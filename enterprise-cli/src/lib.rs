//! The enterprise's command line for the Chukei relay, as a library so the
//! tests can drive it: [`Cli`] is the command line, [`run`] executes it and
//! writes tables (or JSON) to the given writer. Segment syntax lives in
//! [`parse_segment`].
#![forbid(unsafe_code)]

mod batch;
pub mod operator;
mod output;
mod request;

use std::io::Write;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_client::EnterpriseApiClient;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use output::{
    print_bid, print_explanation, print_prices, print_quote, print_slots, print_statement,
    print_stats, print_status, state_name,
};
pub use request::{parse_duration, parse_segment, parse_window, send_request, stats_request};

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
