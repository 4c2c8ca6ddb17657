//! A whole hub in this process: the relay, its carriers and a terminal
//! fleet, started through the same `run` each binary calls, with clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::clock::{Clock, ClockArgs};
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::admin_client::AdminClient;
use chukei_proto::relay::v1::enterprise_api_client::EnterpriseApiClient;
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::{OpenMode, Terminals};
use terminal_sim::{CarrierUrl, FleetOptions};
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::running::{Running, shutdown_on};
use crate::*;

/// One carrier of a test hub.
pub struct CarrierNode {
    pub carrier_id: String,
    pub addr: SocketAddr,
    /// Where its Prometheus endpoint listens, when the settings ask for one.
    pub metrics: Option<SocketAddr>,
    pub token: String,
    pub data_dir: PathBuf,
    /// Where its consent page listens, when the settings ask for one.
    pub consent: Option<SocketAddr>,
    running: Option<Running>,
}

impl CarrierNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// How the relay batches on its carrier streams.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub batch_size: u32,
    pub batches_in_flight: usize,
    pub poll_interval_ms: u64,
}

impl Tuning {
    /// Small batches and quick polls: many batches even in small tests.
    pub const TESTS: Self = Self {
        batch_size: 100,
        batches_in_flight: 4,
        poll_interval_ms: 100,
    };
    /// The relay's own defaults.
    pub const DEFAULTS: Self = Self {
        batch_size: 1000,
        batches_in_flight: 8,
        poll_interval_ms: 500,
    };
}

/// Everything a test may set about a hub beyond its carriers.
#[derive(Clone, Debug)]
pub struct Settings {
    pub tuning: Tuning,
    /// One clock for every service (a manual clock lets tests advance time).
    pub clock: Option<Clock>,
    pub quiet_period_secs: u64,
    pub daily_cap: u32,
    pub daily_budget: u32,
    pub message_ttl_secs: u64,
    /// Statistics cells about attributes or places below this are withheld.
    pub min_cohort: u32,
    /// What happens to a message without a bid in a slot sold by auction.
    pub unbid: relay_svc::auction::Unbid,
    /// The relay and the carriers serve Prometheus metrics (on free ports).
    pub metrics: bool,
    /// How long relay leases last (how soon a replica takes over from a dead one).
    pub lease_ttl_secs: u64,
    /// Deliveries per second each carrier takes (0: unpaced).
    pub carrier_pace_per_sec: u32,
    /// Reconciliation: unconfirmed deliveries are offered again after this
    /// long (clock seconds), at most `max_reoffers` times.
    pub reoffer_after_secs: u64,
    pub max_reoffers: u32,
    /// EnterpriseApi calls a second per enterprise (0: no limit).
    pub enterprise_rate_per_sec: u32,
    /// Waits before each webhook retry (the tests' receivers are local,
    /// so private addresses are allowed).
    pub webhook_retry_schedule: relay_svc::webhooks::RetrySchedule,
    pub webhook_timeout_secs: u64,
    /// The carriers' gateways (SMPP, SMTP); none by default: every channel
    /// goes to the terminals.
    pub carrier_gateways: carrier_svc::gateways::GatewayArgs,
    /// The carriers serve their subscribers' consent page (on free ports).
    pub consent_pages: bool,
    /// The consent page trusts this header to name the subscriber (an
    /// operator's login in front), instead of one-time codes.
    pub consent_header: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tuning: Tuning::TESTS,
            clock: None,
            quiet_period_secs: 0,
            daily_cap: 0,
            daily_budget: 0,
            message_ttl_secs: 3600,
            min_cohort: 10,
            unbid: relay_svc::auction::Unbid::Refuse,
            metrics: false,
            lease_ttl_secs: 10,
            carrier_pace_per_sec: 0,
            reoffer_after_secs: 1800,
            max_reoffers: 3,
            enterprise_rate_per_sec: 0,
            webhook_retry_schedule: relay_svc::webhooks::RetrySchedule::default(),
            webhook_timeout_secs: 15,
            carrier_gateways: carrier_svc::gateways::GatewayArgs::default(),
            consent_pages: false,
            consent_header: None,
        }
    }
}

impl Settings {
    fn clock_args(&self) -> ClockArgs {
        self.clock
            .clone()
            .map(ClockArgs::shared)
            .unwrap_or_default()
    }
}

/// A free loopback address for a metrics endpoint (or another page), when `wanted`.
fn metrics_addr(wanted: bool) -> std::io::Result<Option<SocketAddr>> {
    if !wanted {
        return Ok(None);
    }
    Ok(Some(SocketAddr::from((
        [127, 0, 0, 1],
        process::free_port()?,
    ))))
}

/// A whole hub: the relay, its carriers and (once started) a terminal fleet.
pub struct Hub {
    pub backend: Backend,
    settings: Settings,
    pub relay_addr: SocketAddr,
    /// Where the relay's Prometheus endpoint listens, when the settings ask for one.
    pub relay_metrics: Option<SocketAddr>,
    /// Where the terminal fleet's Prometheus endpoint listens, likewise.
    pub fleet_metrics: Option<SocketAddr>,
    database_url: String,
    postgres_name: Option<String>,
    relay: Option<Running>,
    /// Further relay replicas on the same database.
    replicas: Vec<(SocketAddr, Running)>,
    pub carriers: Vec<CarrierNode>,
    fleet: Option<(Running, Terminals)>,
    /// Where the fleet's Terminal service listens, once started.
    fleet_addr: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Hub {
    /// Starts the relay and `carrier_ids` (registered with the relay), or
    /// returns `None` when the backend is switched off.
    pub async fn start(backend: Backend, carrier_ids: &[&str]) -> anyhow::Result<Option<Self>> {
        Self::start_with(backend, carrier_ids, Tuning::TESTS).await
    }

    /// [`Hub::start`] with the relay tuned as given.
    pub async fn start_with(
        backend: Backend,
        carrier_ids: &[&str],
        tuning: Tuning,
    ) -> anyhow::Result<Option<Self>> {
        let settings = Settings {
            tuning,
            ..Settings::default()
        };
        Self::start_settings(backend, carrier_ids, settings).await
    }

    /// [`Hub::start`] with everything as `settings` say.
    pub async fn start_settings(
        backend: Backend,
        carrier_ids: &[&str],
        settings: Settings,
    ) -> anyhow::Result<Option<Self>> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let (database_url, postgres_name) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("relay.db").display()),
                None,
            ),
            Backend::Postgres => match postgres_database().await? {
                Some((url, name)) => (url, Some(name)),
                None => return Ok(None),
            },
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let relay_addr = listener.local_addr()?;
        let relay_metrics = metrics_addr(settings.metrics)?;
        let fleet_metrics = metrics_addr(settings.metrics)?;
        let mut hub = Self {
            backend,
            settings,
            relay_addr,
            relay_metrics,
            fleet_metrics,
            database_url,
            postgres_name,
            relay: None,
            replicas: Vec::new(),
            carriers: Vec::new(),
            fleet: None,
            fleet_addr: None,
            dir,
        };
        hub.relay = Some(hub.spawn_relay(listener));
        wait_healthy(&hub.relay_url()).await?;
        for carrier_id in carrier_ids {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let mut node = CarrierNode {
                carrier_id: (*carrier_id).to_owned(),
                addr: listener.local_addr()?,
                metrics: metrics_addr(hub.settings.metrics)?,
                token: format!("carrier-token-{carrier_id}-0123456789"),
                data_dir: hub.dir.path().join(carrier_id),
                consent: metrics_addr(hub.settings.consent_pages)?,
                running: None,
            };
            node.running = Some(hub.spawn_carrier(&node, listener));
            wait_healthy(&node.url()).await?;
            hub.admin()
                .await?
                .register_carrier(pb::RegisterCarrierRequest {
                    carrier_id: node.carrier_id.clone(),
                    endpoint: node.url(),
                    token: node.token.clone(),
                })
                .await?;
            hub.carriers.push(node);
        }
        Ok(Some(hub))
    }

    /// The relay's database, for tests that look at what it stores.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// On PostgreSQL, gathers the planner's statistics (`ANALYZE`) as the
    /// server's autovacuum would within a minute of a bulk import — this
    /// machine's server runs with autovacuum off. Returns how long it took;
    /// `None` on SQLite, which needs none.
    pub async fn analyze(&self) -> anyhow::Result<Option<std::time::Duration>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let pool = sqlx::PgPool::connect(&self.database_url).await?;
        sqlx::query("ANALYZE").execute(&pool).await?;
        pool.close().await;
        Ok(Some(started.elapsed()))
    }

    pub fn relay_url(&self) -> String {
        format!("http://{}", self.relay_addr)
    }

    pub fn relay_config(&self) -> relay_svc::Config {
        relay_svc::Config {
            listen: self.relay_addr,
            metrics_listen: self.relay_metrics,
            data_dir: self.dir.path().join("relay"),
            database_url: Some(self.database_url.clone()),
            admin_token: ADMIN_TOKEN.into(),
            deliver_token: DELIVER_TOKEN.into(),
            batch_size: self.settings.tuning.batch_size,
            batches_in_flight: self.settings.tuning.batches_in_flight,
            poll_interval_ms: self.settings.tuning.poll_interval_ms,
            expansion_step: relay_svc::storage::EXPANSION_CHUNK,
            message_ttl_secs: self.settings.message_ttl_secs,
            quiet_period_secs: self.settings.quiet_period_secs,
            daily_cap: self.settings.daily_cap,
            daily_budget: self.settings.daily_budget,
            min_cohort: self.settings.min_cohort,
            min_sample: 30,
            billing_zone: "Asia/Tokyo".into(),
            reprice_interval_secs: 3600,
            unbid_in_auctioned_slot: self.settings.unbid,
            replica_id: None,
            lease_ttl_secs: self.settings.lease_ttl_secs,
            reoffer_after_secs: self.settings.reoffer_after_secs,
            max_reoffers: self.settings.max_reoffers,
            enterprise_rate_per_sec: self.settings.enterprise_rate_per_sec,
            webhook_allow_private: true,
            webhook_retry_schedule: self.settings.webhook_retry_schedule.clone(),
            webhook_timeout_secs: self.settings.webhook_timeout_secs,
            webhook_disable_after_hours: 120,
            shutdown_grace_secs: 5,
            clock: self.settings.clock_args(),
            tls: Default::default(),
        }
    }

    /// Starts another relay replica on the same database; returns its URL.
    pub async fn start_replica(&mut self) -> anyhow::Result<String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let config = relay_svc::Config {
            listen: addr,
            metrics_listen: None,
            ..self.relay_config()
        };
        let running = Running::spawn("relay", listener, |listener, stopped| {
            relay_svc::run(config, listener, shutdown_on(stopped))
        });
        self.replicas.push((addr, running));
        let url = format!("http://{addr}");
        wait_healthy(&url).await?;
        Ok(url)
    }

    /// Kills the first relay abruptly, for good (its replicas stay).
    pub async fn kill_relay(&mut self) {
        if let Some(running) = self.relay.take() {
            running.kill().await;
        }
    }

    fn spawn_relay(&self, listener: std::net::TcpListener) -> Running {
        let config = self.relay_config();
        Running::spawn("relay", listener, |listener, stopped| {
            relay_svc::run(config, listener, shutdown_on(stopped))
        })
    }

    fn spawn_carrier(&self, node: &CarrierNode, listener: std::net::TcpListener) -> Running {
        let config = carrier_svc::Config {
            listen: node.addr,
            subscriber_listen: None,
            carrier_id: node.carrier_id.clone(),
            relay_url: self.relay_url(),
            token: node.token.clone(),
            relay_token: DELIVER_TOKEN.into(),
            admin_token: CARRIER_ADMIN_TOKEN.into(),
            data_dir: node.data_dir.clone(),
            database_url: None,
            default_channel: "sms".into(),
            metrics_listen: node.metrics,
            report_interval_secs: 1,
            pace_per_sec: self.settings.carrier_pace_per_sec,
            poll_interval_ms: 100,
            shutdown_grace_secs: 5,
            clock: self.settings.clock_args(),
            tls: Default::default(),
            gateways: self.settings.carrier_gateways.clone(),
            consent_page: match &self.settings.consent_header {
                Some(header) => carrier_svc::web::ConsentPageArgs {
                    consent_listen: node.consent,
                    consent_sign_in: "header".into(),
                    consent_user_header: header.clone(),
                    ..Default::default()
                },
                None => carrier_svc::web::ConsentPageArgs {
                    consent_listen: node.consent,
                    ..Default::default()
                },
            },
        };
        Running::spawn("carrier", listener, |listener, stopped| {
            carrier_svc::run(config, listener, shutdown_on(stopped))
        })
    }

    pub async fn admin(&self) -> anyhow::Result<Admin> {
        Self::admin_at(&self.relay_url()).await
    }

    /// An Admin client of the relay (replica) at `url`.
    pub async fn admin_at(url: &str) -> anyhow::Result<Admin> {
        let channel = Channel::from_shared(url.to_owned())?.connect().await?;
        Ok(AdminClient::with_interceptor(
            channel,
            BearerInterceptor::new(ADMIN_TOKEN)?,
        ))
    }

    /// An EnterpriseApi client presenting `api_key`.
    pub async fn enterprise(&self, api_key: &str) -> anyhow::Result<Enterprise> {
        Self::enterprise_at(&self.relay_url(), api_key).await
    }

    /// An EnterpriseApi client of the relay (replica) at `url`.
    pub async fn enterprise_at(url: &str, api_key: &str) -> anyhow::Result<Enterprise> {
        let channel = Channel::from_shared(url.to_owned())?.connect().await?;
        Ok(EnterpriseApiClient::with_interceptor(
            channel,
            BearerInterceptor::new(api_key)?,
        ))
    }

    /// Creates an enterprise; returns its id and API key.
    pub async fn create_enterprise(&self, name: &str) -> anyhow::Result<(String, String)> {
        let created = self
            .admin()
            .await?
            .create_enterprise(pb::CreateEnterpriseRequest {
                name: name.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok((created.enterprise_id, created.api_key))
    }

    pub async fn create_service(&self, enterprise_id: &str, name: &str) -> anyhow::Result<String> {
        Ok(self
            .admin()
            .await?
            .create_service(pb::CreateServiceRequest {
                enterprise_id: enterprise_id.into(),
                name: name.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .service_id)
    }

    /// Starts `fleet` as terminals: provisions it into its carriers, attaches
    /// it, registers it with `enterprises`; returns once set up.
    pub async fn start_fleet(
        &mut self,
        fleet: Fleet,
        enterprises: Vec<EnterpriseChoice>,
        open_mode: OpenMode,
    ) -> anyhow::Result<Terminals> {
        let fleet_size = fleet.users.len();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        self.fleet_addr = Some(listener.local_addr()?);
        let options = FleetOptions {
            advertise_url: None,
            carriers: self
                .carriers
                .iter()
                .map(|c| CarrierUrl {
                    carrier_id: c.carrier_id.clone(),
                    url: c.url(),
                })
                .collect(),
            carrier_admin_token: Some(CARRIER_ADMIN_TOKEN.into()),
            enterprises,
            open_mode,
            metrics_listen: self.fleet_metrics,
            withdraw_share: 0.0,
            duplicate_events: 0.0,
            reorder_events: false,
            journal: None,
            clock: self.settings.clock_args(),
            tls: Default::default(),
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let running = Running::spawn("fleet", listener, |listener, stopped| {
            terminal_sim::run_fleet(
                fleet,
                options,
                listener,
                shutdown_on(stopped),
                move |terminals| {
                    let _ = ready_tx.send(terminals);
                },
            )
        });
        let ready_within = Duration::from_secs(60 + fleet_size as u64 / 500);
        let terminals = match tokio::time::timeout(ready_within, ready_rx).await {
            Ok(Ok(terminals)) => terminals,
            _ => {
                let outcome = running.stop().await;
                anyhow::bail!("fleet did not come up: {outcome:?}");
            }
        };
        self.fleet = Some((running, terminals.clone()));
        Ok(terminals)
    }

    /// The fleet's Terminal service, once started.
    pub fn fleet_url(&self) -> Option<String> {
        self.fleet_addr.map(|addr| format!("http://{addr}"))
    }

    /// Stops the terminal fleet: its users are no longer attached anywhere reachable.
    pub async fn stop_fleet(&mut self) -> anyhow::Result<()> {
        if let Some((running, _)) = self.fleet.take() {
            running.stop().await?;
        }
        Ok(())
    }

    /// The operator's per-carrier view of one message.
    pub async fn carrier_stats(&self, message_id: &str) -> anyhow::Result<Vec<pb::CarrierStats>> {
        Ok(self
            .admin()
            .await?
            .get_carrier_stats(pb::GetCarrierStatsRequest {
                message_id: message_id.into(),
            })
            .await?
            .into_inner()
            .carriers)
    }

    /// A carrier's own counts of one message (its `CarrierAdmin.GetCounts`).
    pub async fn carrier_own_counts(
        &self,
        carrier_id: &str,
        message_id: &str,
    ) -> anyhow::Result<chukei_proto::carrier::v1::GetCountsResponse> {
        use chukei_proto::carrier::v1 as carrier;
        let node = &self.carriers[self.carrier_index(carrier_id)];
        let channel = Channel::from_shared(node.url())?.connect().await?;
        let mut client = carrier::carrier_admin_client::CarrierAdminClient::with_interceptor(
            channel,
            BearerInterceptor::new(CARRIER_ADMIN_TOKEN)?,
        );
        Ok(client
            .get_counts(carrier::GetCountsRequest {
                message_id: message_id.into(),
            })
            .await?
            .into_inner())
    }

    fn carrier_index(&self, carrier_id: &str) -> usize {
        self.carriers
            .iter()
            .position(|c| c.carrier_id == carrier_id)
            .unwrap_or_else(|| panic!("no carrier {carrier_id}"))
    }

    /// Kills a carrier abruptly (its database stays).
    pub async fn kill_carrier(&mut self, carrier_id: &str) {
        let index = self.carrier_index(carrier_id);
        if let Some(running) = self.carriers[index].running.take() {
            running.kill().await;
        }
    }

    /// Starts a stopped carrier again on the same address and database.
    pub async fn restart_carrier(&mut self, carrier_id: &str) -> anyhow::Result<()> {
        let index = self.carrier_index(carrier_id);
        let listener = bind_again(self.carriers[index].addr).await?;
        let running = self.spawn_carrier(&self.carriers[index], listener);
        self.carriers[index].running = Some(running);
        wait_healthy(&self.carriers[index].url()).await
    }

    /// Kills the relay abruptly and starts it again on the same database.
    pub async fn kill_and_restart_relay(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.relay.take() {
            running.kill().await;
        }
        let listener = bind_again(self.relay_addr).await?;
        self.relay = Some(self.spawn_relay(listener));
        wait_healthy(&self.relay_url()).await
    }

    /// Waits until the message's counts satisfy `done`; returns the last status.
    pub async fn wait_for_message(
        &self,
        api_key: &str,
        message_id: &str,
        done: impl Fn(&pb::MessageStatus) -> bool,
    ) -> pb::MessageStatus {
        Self::wait_for_message_at(&self.relay_url(), api_key, message_id, done).await
    }

    /// [`Hub::wait_for_message`], asking the relay (replica) at `url`.
    pub async fn wait_for_message_at(
        url: &str,
        api_key: &str,
        message_id: &str,
        done: impl Fn(&pb::MessageStatus) -> bool,
    ) -> pb::MessageStatus {
        let mut client = Self::enterprise_at(url, api_key)
            .await
            .expect("enterprise client");
        let mut last = None;
        let outcome = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(status) = client
                    .get_message(pb::GetMessageRequest {
                        message_id: message_id.into(),
                    })
                    .await
                {
                    let status = status.into_inner();
                    if done(&status) {
                        return status;
                    }
                    last = Some(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            panic!("message {message_id} never got there; last status {last:?}")
        })
    }

    /// Stops everything gracefully, checks each service stopped cleanly, and
    /// drops a PostgreSQL database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some((running, _)) = self.fleet.take() {
            running.stop().await?;
        }
        for carrier in &mut self.carriers {
            if let Some(running) = carrier.running.take() {
                running.stop().await?;
            }
        }
        if let Some(running) = self.relay.take() {
            running.stop().await?;
        }
        for (_, running) in self.replicas.drain(..) {
            running.stop().await?;
        }
        if let Some(name) = &self.postgres_name {
            drop_postgres_database(name).await?;
        }
        Ok(())
    }
}

/// Binds a listener to an address that was just released (retrying briefly).
async fn bind_again(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "address not free yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Waits until the gRPC health service at `url` answers SERVING (overall).
pub async fn wait_healthy(url: &str) -> anyhow::Result<()> {
    wait_healthy_for(url, Duration::from_secs(30)).await
}

/// [`wait_healthy`] with another deadline (a large fleet takes a while to set up).
pub async fn wait_healthy_for(url: &str, timeout: Duration) -> anyhow::Result<()> {
    use chukei_proto::health::{HealthCheckRequest, HealthClient, ServingStatus};
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(channel) = Channel::from_shared(url.to_owned())?.connect().await {
            let mut client = HealthClient::new(channel);
            if let Ok(response) = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if response.into_inner().status == ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("{url} did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
