//! The Chukei relay as a library: `main` parses [`Config`], sets up telemetry,
//! binds, and calls [`run`]; the integration tests call the same `run`.
//!
//! Code map: [`grpc`] is the edge (auth, validation, wire ⇄ domain);
//! [`targeting`] and [`registry`] are the domain types; [`storage`] is the one
//! seam over SQLite/PostgreSQL; [`expansion`] extracts recipients of large
//! targets after the answer; [`dispatch`] transfers deliveries to carriers and
//! takes receipts back ([`receipts`]); [`policy`] holds delivery control's
//! rules and [`control`] the loop that carries them out over time (timers,
//! windows, expiry); [`rollup`] folds events into the statistics tables,
//! [`stats`] turns the rolled-up counts into estimates and
//! [`learning`] chooses each person's channel for `best`.
#![forbid(unsafe_code)]

pub mod auction;
pub mod config;
pub mod console;
pub mod content;
pub mod control;
pub mod credentials;
pub mod dispatch;
pub mod error;
pub mod expansion;
pub mod grpc;
pub mod learning;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod pricing;
pub mod receipts;
pub mod registry;
pub mod rest;
pub mod rollup;
pub mod service;
pub mod stats;
pub mod storage;
pub mod targeting;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::relay::v1::{admin_server, carrier_ingress_server, enterprise_api_server};
use chukei_proto::server;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::dispatch::{DispatchConfig, DispatchHandle};
use crate::grpc::{AdminService, EnterpriseService, IngressService, Market, Relay};
use crate::lease::Lease;
use crate::metrics::RelayMetrics;
use crate::storage::{Reconciling, Store};

/// Largest gRPC message the relay accepts or sends.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Runs the relay on `listener` until `shutdown` resolves, then stops
/// accepting, finishes in-flight work and stops its workers within one
/// grace period, and closes the database.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    if config.database_url.is_none() {
        std::fs::create_dir_all(&config.data_dir)?;
    }
    let store = Store::connect(&config.database_url()).await?;
    tracing::info!(backend = store.backend(), addr = %listener.local_addr()?, "relay starting");
    let cancel = CancellationToken::new();
    let deadline = server::shutdown_deadline(&cancel, config.shutdown_grace());
    let registry = chukei_proto::metrics::Registry::new();
    let lease = Lease {
        replica: config
            .replica_id
            .clone()
            .unwrap_or_else(|| {
                lease::default_replica_id(listener.local_addr().map_or(0, |a| a.port()))
            })
            .into(),
        ttl: Duration::from_secs(config.lease_ttl_secs),
        timing: Some(registry.histogram(
            "chukei_relay_lease_hold_seconds",
            "Time each lease hold or renewal took, by lease kind (carrier, control) (seconds)",
            &chukei_proto::metrics::LATENCY_BUCKETS,
        )),
    };
    store.time_write_turns(registry.histogram(
        "chukei_relay_write_turn_seconds",
        "Time each SQLite writer held the write turn, by writer (accepts, deliveries, or the storage module: expanding, stats, control, …) (seconds)",
        &chukei_proto::metrics::LATENCY_BUCKETS,
    ));
    tracing::info!(replica = %lease.replica, "relay replica");
    let (relay, workers) =
        start_workers(&config, &store, &lease, &registry, cancel.child_token()).await?;
    let router = routes(&config, &registry, relay).await?;
    let served = server::serve(
        router,
        listener,
        shutdown,
        cancel.clone(),
        config.shutdown_grace(),
    )
    .await;

    cancel.cancel();
    workers.stop(deadline.await?).await;
    lease.release_all(&store).await;
    store.close().await;
    tracing::info!("relay stopped");
    served
}

/// Starts the relay's background workers — the metrics endpoint, the
/// dispatchers, the expander, delivery control, the rollup fold, the
/// webhook sender — on
/// `workers`' cancellation, and the state the edge's handlers share.
async fn start_workers(
    config: &Config,
    store: &Store,
    lease: &Lease,
    registry: &chukei_proto::metrics::Registry,
    cancel: CancellationToken,
) -> anyhow::Result<(Relay, server::Workers)> {
    let clock = config.clock.clock();
    let mut workers = server::Workers::default();
    let metrics = RelayMetrics::new(registry);
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
        let serve = chukei_proto::metrics::serve(listener, registry.clone(), cancel.clone());
        workers.add("metrics", tokio::spawn(serve));
    }
    let (dispatch, dispatch_task) = dispatch::start(
        store.clone(),
        clock.clone(),
        dispatch_config(config, &metrics, lease),
        cancel.clone(),
    );
    workers.add("dispatch", dispatch_task);
    let drain = dispatch.clone();
    metrics::collect_on_scrape(
        store.clone(),
        clock.clone(),
        Arc::new(move |carrier, backlog| drain.drain_estimate(Some(carrier), backlog)),
        metrics.clone(),
    );
    let expand = Arc::new(tokio::sync::Notify::new());
    let attention = config.attention();
    let expander = expansion::start(
        store.clone(),
        clock.clone(),
        metrics.clone(),
        expansion::Planning {
            attention,
            step: config.expansion_step,
        },
        expand.clone(),
        dispatch.clone(),
        cancel.clone(),
    );
    workers.add("expansion", expander);
    let control = control_loop(config, store, &clock, &dispatch, &metrics, lease);
    workers.add("control", control::start(control, cancel.clone()));
    let interval = Duration::from_millis(config.poll_interval_ms);
    let rollup = rollup::start(store.clone(), clock.clone(), interval, cancel.clone());
    workers.add("rollup", rollup);
    if let Some(checkpoints) = store.start_checkpoints(cancel.clone()) {
        workers.add("checkpoints", checkpoints);
    }
    let webhooks = webhooks::sender::start(
        store.clone(),
        clock.clone(),
        config.webhooks(),
        metrics.clone(),
        cancel,
    );
    workers.add("webhooks", webhooks);
    let relay = Relay {
        store: store.clone(),
        clock,
        dispatch,
        expand,
        admin_token: config.admin_token.as_str().into(),
        message_ttl_ms: (config.message_ttl_secs * 1000) as i64,
        attention,
        thresholds: config.thresholds(),
        metrics,
        market: market(config)?,
        limits: crate::limits::RateLimits::new(config.enterprise_rate_per_sec).map(Arc::new),
        carrier_certificates: config.tls.verifies_clients(),
        webhook_allow_private: config.webhook_allow_private,
    };
    Ok((relay, workers))
}

/// The dispatchers' settings, from the relay's.
fn dispatch_config(config: &Config, metrics: &RelayMetrics, lease: &Lease) -> DispatchConfig {
    DispatchConfig {
        deliver_token: config.deliver_token.clone(),
        batch_size: config.batch_size,
        batches_in_flight: config.batches_in_flight,
        poll_interval: Duration::from_millis(config.poll_interval_ms),
        metrics: metrics.clone(),
        lease: lease.clone(),
        tls: config.tls.clone(),
    }
}

/// The follow-through loop, as configured.
fn control_loop(
    config: &Config,
    store: &Store,
    clock: &Clock,
    dispatch: &DispatchHandle,
    metrics: &RelayMetrics,
    lease: &Lease,
) -> control::Control {
    control::Control {
        store: store.clone(),
        clock: clock.clone(),
        dispatch: dispatch.clone(),
        metrics: metrics.clone(),
        interval: Duration::from_millis(config.poll_interval_ms),
        reprice_interval_ms: (config.reprice_interval_secs * 1000) as i64,
        reconciling: Reconciling {
            after_ms: (config.reoffer_after_secs * 1000) as i64,
            max_reoffers: i64::from(config.max_reoffers),
        },
        lease: lease.clone(),
    }
}

/// The billing zone and the auction's rule for unbid sends, as configured.
fn market(config: &Config) -> anyhow::Result<Market> {
    Ok(Market {
        zone_name: config.billing_zone.as_str().into(),
        zone: jiff::tz::TimeZone::get(&config.billing_zone)?,
        unbid: config.unbid_in_auctioned_slot,
    })
}

/// The relay's port: the three Chukei services, health and reflection.
async fn routes(
    config: &Config,
    registry: &chukei_proto::metrics::Registry,
    relay: Relay,
) -> anyhow::Result<server::Router> {
    let services = [
        enterprise_api_server::SERVICE_NAME,
        carrier_ingress_server::SERVICE_NAME,
        admin_server::SERVICE_NAME,
    ];
    let (_, health_service) = server::health(&services).await;
    // REST/JSON beside gRPC on the one port: HTTP/1.1 too, for clients that
    // speak nothing else (gRPC stays HTTP/2).
    // The enterprise console: pages under /console on the same port.
    let rest = tonic::service::Routes::from(rest::router(relay.clone()).merge(console::router(
        relay.clone(),
        config.tls.tls_cert.is_some(),
    )));
    Ok(
        server::builder(registry, "chukei_relay_rpc_duration_seconds", &config.tls)?
            .accept_http1(true)
            .add_routes(rest)
            .add_service(health_service)
            .add_service(server::reflection(&services)?)
            .add_service(server::reflection_v1alpha(&services)?)
            .add_service(
                enterprise_api_server::EnterpriseApiServer::new(EnterpriseService(relay.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                carrier_ingress_server::CarrierIngressServer::new(IngressService(relay.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                admin_server::AdminServer::new(AdminService(relay))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            ),
    )
}
