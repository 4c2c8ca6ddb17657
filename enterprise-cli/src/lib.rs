//! The enterprise's command line for the Chukei relay, as a library so the
//! tests can drive it: [`Cli`] is the command line, [`run`] executes it and
//! writes tables (or JSON) to the given writer. Segment syntax lives in
//! [`parse_segment`].
#![forbid(unsafe_code)]

mod batch;
pub mod cmd;
pub mod operator;
mod output;
mod request;

use std::io::Write;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1::enterprise_api_client::EnterpriseApiClient;
use clap::{Parser, Subcommand};

pub use cmd::auction::AuctionCommand;
pub use cmd::send::SendArgs;
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
    Status(cmd::status::Status),
    /// Why and how a message went (or did not go) to one of your refs.
    Explain(cmd::explain::Explain),
    /// Sent, delivered, opened and open rate (with its 95% interval) of your
    /// messages, grouped by any of: channel, hour, open_hour, weekday, day,
    /// place, gender, age, region, occupation, user.
    Stats(cmd::stats::Stats),
    /// The prices in force: yen per delivered and per opened message by
    /// channel and local hour.
    Prices,
    /// Your charges for one month, from the billing ledger.
    Billing(cmd::billing::Billing),
    /// The capacity auction: slots, bids, results.
    #[command(subcommand)]
    Auction(AuctionCommand),
    /// Your registered users, by ref.
    Registrations(cmd::registrations::Registrations),
    /// Status webhooks: endpoints the relay POSTs each person's events to.
    #[command(subcommand)]
    Webhooks(cmd::webhooks::WebhooksCommand),
}

impl Command {
    /// The subcommand's name, e.g. `send` (a span name: no arguments in it).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Send(_) => "send",
            Self::Status(_) => "status",
            Self::Explain(_) => "explain",
            Self::Stats(_) => "stats",
            Self::Prices => "prices",
            Self::Billing(_) => "billing",
            Self::Auction(_) => "auction",
            Self::Registrations(_) => "registrations",
            Self::Webhooks(_) => "webhooks",
        }
    }
}

/// Where a command writes its table or JSON.
pub(crate) type Out<'a> = &'a mut (dyn Write + Send);

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
    let client = &mut client;
    match &cli.command {
        Command::Send(args) => args.run(client, cli.json, out).await,
        Command::Status(status) => status.run(client, cli.json, out).await,
        Command::Explain(why) => why.run(client, cli.json, out).await,
        Command::Stats(stats) => stats.run(client, cli.json, out).await,
        Command::Prices => cmd::billing::prices(client, cli.json, out).await,
        Command::Billing(billing) => billing.run(client, cli.json, out).await,
        Command::Auction(auction) => auction.run(client, cli.json, out).await,
        Command::Registrations(list) => list.run(client, cli.json, out).await,
        Command::Webhooks(webhooks) => webhooks.run(client, cli.json, out).await,
    }
}
