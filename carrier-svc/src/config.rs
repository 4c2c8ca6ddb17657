//! The carrier's configuration: every flag is also an environment variable
//! (`CHUKEI_CARRIER_*`), validated before a port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chukei_proto::clock::ClockArgs;

use crate::storage::Store;

/// A Chukei carrier: subscribers, the relay's Deliver stream, pushes to terminals.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "carrier-svc", version, about)]
pub struct Config {
    /// Address the gRPC server (Carrier, SubscriberApi, CarrierAdmin, health, reflection) listens on.
    #[arg(long, env = "CHUKEI_CARRIER_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,

    /// A separate address for the subscriber-facing services (SubscriberApi,
    /// CarrierAdmin, with health and reflection); `--listen` then serves only the
    /// relay's Deliver stream, so a network policy can admit only the relay to it.
    #[arg(long, env = "CHUKEI_CARRIER_SUBSCRIBER_LISTEN")]
    pub subscriber_listen: Option<SocketAddr>,

    /// This carrier's id at the relay (its communication device id).
    #[arg(long, env = "CHUKEI_CARRIER_ID")]
    pub carrier_id: String,

    /// The relay's gRPC URL, for CarrierIngress.
    #[arg(
        long,
        env = "CHUKEI_CARRIER_RELAY_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub relay_url: String,

    /// The token this carrier presents to the relay's CarrierIngress.
    #[arg(long, env = "CHUKEI_CARRIER_TOKEN", hide_env_values = true)]
    pub token: String,

    /// The token the relay must present on the Deliver stream.
    #[arg(long, env = "CHUKEI_CARRIER_RELAY_TOKEN", hide_env_values = true)]
    pub relay_token: String,

    /// The carrier operator's credential for CarrierAdmin.
    #[arg(long, env = "CHUKEI_CARRIER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    /// Directory for the carrier's SQLite database.
    #[arg(long, env = "CHUKEI_CARRIER_DATA_DIR", default_value = "data/carrier")]
    pub data_dir: PathBuf,

    /// `sqlite://path`. Default: `carrier.db` in the data directory.
    #[arg(long, env = "CHUKEI_CARRIER_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Channel used when the relay gives none: rcs, sms, sns or email.
    #[arg(long, env = "CHUKEI_CARRIER_DEFAULT_CHANNEL", default_value = "sms")]
    pub default_channel: String,

    /// How often a per-message count report goes to the relay (seconds of clock time).
    #[arg(
        long,
        env = "CHUKEI_CARRIER_REPORT_INTERVAL_SECS",
        default_value_t = 3600
    )]
    pub report_interval_secs: u64,

    /// How often held deliveries are re-checked for their time window and expiry (ms, real time).
    #[arg(long, env = "CHUKEI_CARRIER_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,

    /// Deliveries per second (real time) this carrier takes from the relay;
    /// 0: as fast as they come. Models a slow carrier: the backlog waits at
    /// the relay.
    #[arg(long, env = "CHUKEI_CARRIER_PACE_PER_SEC", default_value_t = 0)]
    pub pace_per_sec: u32,

    /// Address of the Prometheus endpoint (`GET /metrics`); unset: no endpoint.
    #[arg(long, env = "CHUKEI_CARRIER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// How long shutdown waits for in-flight work (seconds).
    #[arg(long, env = "CHUKEI_CARRIER_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    pub clock: ClockArgs,

    #[command(flatten)]
    pub tls: chukei_proto::tls::TlsArgs,

    /// SMS to an SMSC over SMPP, e-mail to a mail server over SMTP.
    #[command(flatten)]
    pub gateways: crate::gateways::GatewayArgs,

    /// The subscribers' consent page.
    #[command(flatten)]
    pub consent_page: crate::web::ConsentPageArgs,
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.carrier_id.is_empty()
            || !self
                .carrier_id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            anyhow::bail!("--carrier-id: must be lowercase a-z, 0-9, '-' or '_'");
        }
        for (flag, token) in [
            ("--token", &self.token),
            ("--relay-token", &self.relay_token),
            ("--admin-token", &self.admin_token),
        ] {
            if token.len() < 16 {
                anyhow::bail!("{flag}: must be at least 16 characters");
            }
        }
        if self.relay_url.parse::<tonic::transport::Uri>().is_err()
            || !self.relay_url.starts_with("http")
        {
            anyhow::bail!("--relay-url: must be an http(s) URL");
        }
        self.default_channel()?;
        if self.report_interval_secs == 0 {
            anyhow::bail!("--report-interval-secs: must be positive");
        }
        if self.poll_interval_ms == 0 {
            anyhow::bail!("--poll-interval-ms: must be positive");
        }
        if let Some(url) = &self.database_url {
            if !url.starts_with("sqlite:") {
                anyhow::bail!("--database-url: the carrier stores in SQLite (sqlite:…)");
            }
        }
        self.gateways.validate()?;
        self.consent_page.validate()?;
        self.clock.validate()
    }

    /// The default channel as a `chukei.common.v1.Channel` value.
    pub fn default_channel(&self) -> anyhow::Result<i64> {
        chukei_proto::common::v1::Channel::from_short_name(&self.default_channel)
            .map(|channel| channel as i64)
            .ok_or_else(|| {
                anyhow::anyhow!("--default-channel: must be one of rcs, sms, sns, email")
            })
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| Store::sqlite_url_in(&self.data_dir))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
