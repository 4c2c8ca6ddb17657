//! A fleet of simulated terminals as a library: `main` parses the command
//! line and calls [`run_fleet`] (or the interactive mode); the integration
//! tests call `run_fleet` with fleets they build themselves.
//!
//! Code map: [`fleet`] generates users and their behaviour from a seed;
//! [`terminal`] hosts `Terminal.Push` and the opening model; [`setup`]
//! provisions, attaches and registers the fleet through real carriers;
//! [`rng`] keeps every decision reproducible.
#![forbid(unsafe_code)]

pub mod fleet;
pub mod rng;
pub mod setup;
pub mod terminal;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use chukei_proto::clock::ClockArgs;
use chukei_proto::server;
use chukei_proto::terminal::v1::terminal_server::TerminalServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::setup::EnterpriseChoice;
use crate::terminal::{OpenMode, TerminalFaults, Terminals};

/// A carrier the fleet talks to: `ID=URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarrierUrl {
    pub carrier_id: String,
    pub url: String,
}

impl std::str::FromStr for CarrierUrl {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.split_once('=') {
            Some((id, url)) if !id.is_empty() && url.starts_with("http") => Ok(Self {
                carrier_id: id.to_owned(),
                url: url.to_owned(),
            }),
            _ => Err("expected CARRIER_ID=http://host:port".into()),
        }
    }
}

/// What `terminal-sim fleet` does besides hosting the terminals.
#[derive(clap::Args, Clone, Debug)]
pub struct FleetOptions {
    /// The URL carriers use to reach this fleet's Terminal service (default: http://<listen address>).
    #[arg(long, env = "CHUKEI_TERMINAL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// The fleet's carriers, `ID=URL`; repeat the flag (or comma-separate in the env var).
    #[arg(
        long = "carrier",
        env = "CHUKEI_TERMINAL_CARRIERS",
        value_delimiter = ',',
        required = true
    )]
    pub carriers: Vec<CarrierUrl>,

    /// The carriers' admin token: when given, the fleet provisions its own subscriber records first.
    #[arg(
        long,
        env = "CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub carrier_admin_token: Option<String>,

    /// Enterprises to register users with, `ENTERPRISE_ID[:SERVICE_ID,…]`; repeat the flag.
    #[arg(
        long = "enterprise",
        env = "CHUKEI_TERMINAL_ENTERPRISES",
        value_delimiter = ' '
    )]
    pub enterprises: Vec<EnterpriseChoice>,

    /// How users open messages.
    #[arg(
        long,
        env = "CHUKEI_TERMINAL_OPEN_MODE",
        value_enum,
        default_value = "model"
    )]
    pub open_mode: OpenMode,

    /// Address of the Prometheus endpoint (`GET /metrics`); unset: no endpoint.
    #[arg(long, env = "CHUKEI_TERMINAL_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// The share (0–1) of registered users who withdraw their consent to an
    /// enterprise once the fleet is set up (seeded): attributes deleted at
    /// the relay, registration kept.
    #[arg(long, env = "CHUKEI_TERMINAL_WITHDRAW_SHARE", default_value_t = 0.0)]
    pub withdraw_share: f64,

    /// Chaos runs: the share (0–1) of event batches the terminals send twice.
    #[arg(long, env = "CHUKEI_TERMINAL_DUPLICATE_EVENTS", default_value_t = 0.0)]
    pub duplicate_events: f64,

    /// Chaos runs: terminals send each batch of events in reverse order and
    /// up to 200 ms late, so reads may overtake deliveries.
    #[arg(long, env = "CHUKEI_TERMINAL_REORDER_EVENTS")]
    pub reorder_events: bool,

    /// Chaos runs: append "message_id user_id delivery_id" to this file for
    /// every message a terminal receives for the first time.
    #[arg(long, env = "CHUKEI_TERMINAL_JOURNAL")]
    pub journal: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub clock: ClockArgs,

    #[command(flatten)]
    pub tls: chukei_proto::tls::TlsArgs,
}

/// Hosts `fleet` on `listener` until `shutdown`: serves the terminals, then
/// provisions (when asked), attaches and registers the fleet, and reports
/// SERVING on gRPC health once set up. `ready` is called with the handle then.
pub async fn run_fleet(
    fleet: Fleet,
    options: FleetOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(Terminals) + Send,
) -> anyhow::Result<()> {
    options.clock.validate()?;
    let advertise = options.advertise_url.clone().unwrap_or_else(|| {
        format!(
            "http://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        )
    });
    let cancel = CancellationToken::new();
    if !(0.0..=1.0).contains(&options.duplicate_events) {
        anyhow::bail!("--duplicate-events: must be between 0 and 1");
    }
    let journal = match &options.journal {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| anyhow::anyhow!("--journal: {}: {error}", path.display()))?,
        ),
        None => None,
    };
    let terminals = Terminals::with_faults(
        std::sync::Arc::new(fleet),
        options.clock.clock(),
        options.open_mode,
        cancel.clone(),
        TerminalFaults {
            duplicate_events: options.duplicate_events,
            reorder_events: options.reorder_events,
            journal,
        },
    );
    const TERMINAL: &str = chukei_proto::terminal::v1::terminal_server::SERVICE_NAME;
    let (health_reporter, health_service) = server::health(&[]).await;
    // Not ready (overall, and the Terminal service) until the fleet is set up.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health_reporter
        .set_not_serving::<TerminalServer<Terminals>>()
        .await;
    let registry = chukei_proto::metrics::Registry::new();
    if let Some(addr) = options.metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
        tokio::spawn(chukei_proto::metrics::serve(
            listener,
            registry.clone(),
            cancel.clone(),
        ));
    }
    let router = server::builder(
        &registry,
        "chukei_terminal_rpc_duration_seconds",
        &options.tls,
    )?
    .add_service(health_service)
    .add_service(server::reflection(&[TERMINAL])?)
    .add_service(server::reflection_v1alpha(&[TERMINAL])?)
    .add_service(
        TerminalServer::new(terminals.clone()).max_decoding_message_size(64 * 1024 * 1024),
    );
    let server = tokio::spawn(server::serve(
        router,
        listener,
        shutdown,
        cancel.clone(),
        Duration::from_secs(5),
    ));

    let carriers: HashMap<String, String> = options
        .carriers
        .iter()
        .map(|c| (c.carrier_id.clone(), c.url.clone()))
        .collect();
    let fleet = terminals.fleet();
    let setup = async {
        let channels = setup::connect(&carriers, &options.tls).await?;
        if let Some(token) = &options.carrier_admin_token {
            setup::provision(fleet, &channels, token).await?;
        }
        setup::attach(fleet, &channels, &advertise).await?;
        let registered = setup::register(fleet, &channels, &options.enterprises).await?;
        let withdrawn = setup::withdraw(
            fleet,
            &channels,
            &options.enterprises,
            options.withdraw_share,
        )
        .await?;
        if withdrawn > 0 {
            tracing::info!(withdrawn, "consents withdrawn");
        }
        anyhow::Ok(registered)
    };
    tokio::select! {
        set_up = setup => {
            let registered = set_up?;
            tracing::info!(users = fleet.users.len(), registered, "fleet set up");
            health_reporter.set_serving::<TerminalServer<Terminals>>().await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            ready(terminals.clone());
        }
        () = cancel.cancelled() => {}
    }
    let served = server.await?;
    cancel.cancel();
    terminals.stopped().await;
    served
}
