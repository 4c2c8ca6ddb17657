//! The relay's configuration: every flag is also an environment variable
//! (`CHUKEI_RELAY_*`), and everything is validated before a port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chukei_proto::clock::ClockArgs;

use crate::auction::Unbid;
use crate::policy::AttentionConfig;
use crate::stats::Thresholds;
use crate::storage::Store;

/// The Chukei relay: registries, recipient extraction, routing and transfer
/// to carriers, and receipts.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "relay-svc", version, about)]
pub struct Config {
    /// Address the relay listens on: gRPC (EnterpriseApi, CarrierIngress, Admin, health, reflection) and the REST API (/v1, HTTP/1.1 and HTTP/2).
    #[arg(long, env = "CHUKEI_RELAY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory for the embedded SQLite database (used when no database URL is given).
    #[arg(long, env = "CHUKEI_RELAY_DATA_DIR", default_value = "data/relay")]
    pub data_dir: PathBuf,

    /// `sqlite://path` or `postgres://user@host/db`. Default: `relay.db` in the data directory.
    #[arg(long, env = "CHUKEI_RELAY_DATABASE_URL")]
    pub database_url: Option<String>,

    /// The operator's credential for the Admin service (at least 16 characters).
    #[arg(long, env = "CHUKEI_RELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    /// The credential the relay presents to carriers when it opens their Deliver stream.
    #[arg(long, env = "CHUKEI_RELAY_DELIVER_TOKEN", hide_env_values = true)]
    pub deliver_token: String,

    /// Deliveries per batch on a carrier stream.
    #[arg(long, env = "CHUKEI_RELAY_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: u32,

    /// Unacknowledged batches allowed in flight per carrier.
    #[arg(long, env = "CHUKEI_RELAY_BATCHES_IN_FLIGHT", default_value_t = 8)]
    pub batches_in_flight: usize,

    /// Registrations a campaign's expansion plans per transaction (a step):
    /// smaller steps hold SQLite's writer for less time, larger ones cost
    /// fewer statements per person.
    #[arg(long, env = "CHUKEI_RELAY_EXPANSION_STEP", default_value_t = crate::storage::EXPANSION_CHUNK)]
    pub expansion_step: u32,

    /// How often dispatchers look for due deliveries when nothing woke them (ms).
    #[arg(long, env = "CHUKEI_RELAY_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,

    /// How long a message stays deliverable after acceptance (seconds of clock time).
    #[arg(long, env = "CHUKEI_RELAY_MESSAGE_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub message_ttl_secs: u64,

    /// Quiet period either side of a targeted message: the person's campaign
    /// messages from any enterprise are deferred past it (seconds; 0 = off).
    #[arg(long, env = "CHUKEI_RELAY_QUIET_PERIOD_SECS", default_value_t = 0)]
    pub quiet_period_secs: u64,

    /// Campaign messages per person per day while they keep opening; the cap
    /// shrinks as their open rate falls (0 = no fatigue cap).
    #[arg(long, env = "CHUKEI_RELAY_DAILY_CAP", default_value_t = 0)]
    pub daily_cap: u32,

    /// Hub-wide campaign messages per person per day, from all enterprises
    /// together (0 = no budget).
    #[arg(long, env = "CHUKEI_RELAY_DAILY_BUDGET", default_value_t = 0)]
    pub daily_budget: u32,

    /// Statistics cells about attributes or places with fewer events than
    /// this are withheld, so no breakdown narrows down to a few people.
    #[arg(long, env = "CHUKEI_RELAY_MIN_COHORT", default_value_t = 10)]
    pub min_cohort: u32,

    /// Open rates over fewer deliveries than this are marked low-sample.
    #[arg(long, env = "CHUKEI_RELAY_MIN_SAMPLE", default_value_t = 30)]
    pub min_sample: u32,

    /// IANA zone whose local hours are the price slots and whose months are
    /// the billing periods.
    #[arg(long, env = "CHUKEI_RELAY_BILLING_ZONE", default_value = "Asia/Tokyo")]
    pub billing_zone: String,

    /// How often dynamic prices are recomputed from the slots' open rates
    /// (seconds of clock time).
    #[arg(
        long,
        env = "CHUKEI_RELAY_REPRICE_INTERVAL_SECS",
        default_value_t = 3600
    )]
    pub reprice_interval_secs: u64,

    /// A message without a bid whose first send falls in a slot sold by
    /// auction is refused, or deferred until the slot ends.
    #[arg(long, env = "CHUKEI_RELAY_UNBID_IN_AUCTIONED_SLOT", value_enum, default_value_t = Unbid::Refuse)]
    pub unbid_in_auctioned_slot: Unbid,

    /// This replica's name in leases shared with other relays on the same
    /// database (default: host name and listening port).
    #[arg(long, env = "CHUKEI_RELAY_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// How long a replica's leases (carrier streams, the follow-through
    /// loop) last without renewal: how soon another replica takes over from
    /// one that died (seconds).
    #[arg(long, env = "CHUKEI_RELAY_LEASE_TTL_SECS", default_value_t = 10)]
    pub lease_ttl_secs: u64,

    /// Reconciliation: a handed-over delivery no carrier has confirmed
    /// (delivered or failed) this long is offered to its carrier again, and
    /// once its message expired this long ago it is expired at the relay
    /// (seconds of clock time).
    #[arg(long, env = "CHUKEI_RELAY_REOFFER_AFTER_SECS", default_value_t = 1800)]
    pub reoffer_after_secs: u64,

    /// Reconciliation: how many times an unconfirmed delivery is offered again
    /// at most.
    #[arg(long, env = "CHUKEI_RELAY_MAX_REOFFERS", default_value_t = 3)]
    pub max_reoffers: u32,

    /// Calls a second each enterprise may make to EnterpriseApi (bursts of
    /// one second's worth); over it, RESOURCE_EXHAUSTED with a retry hint
    /// (google.rpc.RetryInfo). 0: no limit.
    #[arg(
        long,
        env = "CHUKEI_RELAY_ENTERPRISE_RATE_PER_SEC",
        default_value_t = 0
    )]
    pub enterprise_rate_per_sec: u32,

    /// Address of the Prometheus endpoint (`GET /metrics`); unset: no endpoint.
    #[arg(long, env = "CHUKEI_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How long shutdown waits for in-flight work before giving up (seconds).
    #[arg(long, env = "CHUKEI_RELAY_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Webhook endpoints may point at loopback and private addresses.
    /// Off by default: an enterprise's URL must not reach into the
    /// operator's own network (server-side request forgery).
    #[arg(long, env = "CHUKEI_RELAY_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,

    /// Waits before each retry of a webhook batch that failed, the last
    /// repeated (units ms, s, m, h, d).
    #[arg(
        long,
        env = "CHUKEI_RELAY_WEBHOOK_RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,24h"
    )]
    pub webhook_retry_schedule: crate::webhooks::RetrySchedule,

    /// How long one webhook POST may take, connecting included (seconds).
    #[arg(long, env = "CHUKEI_RELAY_WEBHOOK_TIMEOUT_SECS", default_value_t = 15)]
    pub webhook_timeout_secs: u64,

    /// A webhook endpoint failing this long is disabled (hours of clock time).
    #[arg(
        long,
        env = "CHUKEI_RELAY_WEBHOOK_DISABLE_AFTER_HOURS",
        default_value_t = 120
    )]
    pub webhook_disable_after_hours: u64,

    #[command(flatten)]
    pub clock: ClockArgs,

    #[command(flatten)]
    pub tls: chukei_proto::tls::TlsArgs,
}

impl Config {
    /// Checks every setting; the error names the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.admin_token.len() < 16 {
            anyhow::bail!("--admin-token: must be at least 16 characters");
        }
        if self.deliver_token.len() < 16 {
            anyhow::bail!("--deliver-token: must be at least 16 characters");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            anyhow::bail!("--batch-size: must be between 1 and 10000");
        }
        if !(1..=256).contains(&self.batches_in_flight) {
            anyhow::bail!("--batches-in-flight: must be between 1 and 256");
        }
        if self.poll_interval_ms == 0 {
            anyhow::bail!("--poll-interval-ms: must be positive");
        }
        if !(1..=1_000_000).contains(&self.expansion_step) {
            anyhow::bail!("--expansion-step: must be between 1 and 1000000");
        }
        if self.message_ttl_secs == 0 {
            anyhow::bail!("--message-ttl-secs: must be positive");
        }
        if self.reoffer_after_secs == 0 || self.reoffer_after_secs > 7 * 24 * 3600 {
            anyhow::bail!("--reoffer-after-secs: must be between 1 and a week");
        }
        if self.quiet_period_secs > 7 * 24 * 3600 {
            anyhow::bail!("--quiet-period-secs: must be at most a week");
        }
        if self.daily_cap > 1_000 || self.daily_budget > 1_000 {
            anyhow::bail!("--daily-cap / --daily-budget: must be at most 1000");
        }
        if self.min_cohort == 0 {
            anyhow::bail!("--min-cohort: must be at least 1");
        }
        if jiff::tz::TimeZone::get(&self.billing_zone).is_err() {
            anyhow::bail!(
                "--billing-zone: {:?} is not an IANA time zone",
                self.billing_zone
            );
        }
        if !(1..=300).contains(&self.lease_ttl_secs) {
            anyhow::bail!("--lease-ttl-secs: must be 1..300");
        }
        if self
            .replica_id
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > 128)
        {
            anyhow::bail!("--replica-id: must be 1..128 characters");
        }
        if !(1..=300).contains(&self.webhook_timeout_secs) {
            anyhow::bail!("--webhook-timeout-secs: must be 1..300");
        }
        if self.webhook_disable_after_hours == 0 {
            anyhow::bail!("--webhook-disable-after-hours: must be positive");
        }
        if self.reprice_interval_secs == 0 {
            anyhow::bail!("--reprice-interval-secs: must be positive");
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                anyhow::bail!("--database-url: expected sqlite:… or postgres://…");
            }
        }
        self.clock.validate()
    }

    /// The database URL in force: the flag, or the SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| Store::sqlite_url_in(&self.data_dir))
    }

    /// The attention settings: quiet period, fatigue cap, hub budget.
    pub fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            daily_cap: i64::from(self.daily_cap),
            daily_budget: i64::from(self.daily_budget),
            quiet_period_ms: (self.quiet_period_secs * 1000) as i64,
        }
    }

    /// The statistics thresholds: minimum cohort and sample.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            min_cohort: u64::from(self.min_cohort),
            min_sample: u64::from(self.min_sample),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

impl Config {
    /// The webhook sender's settings.
    pub fn webhooks(&self) -> crate::webhooks::sender::SenderConfig {
        crate::webhooks::sender::SenderConfig {
            allow_internal: self.webhook_allow_private,
            schedule: self.webhook_retry_schedule.clone(),
            timeout: Duration::from_secs(self.webhook_timeout_secs),
            poll: Duration::from_millis(self.poll_interval_ms.min(1_000)),
            disable_after: Duration::from_secs(self.webhook_disable_after_hours * 3600),
            ..Default::default()
        }
    }
}
