//! A Chukei carrier as a library: `main` parses [`Config`], sets up telemetry,
//! binds, and calls [`run`]; the integration tests call the same `run`.
//!
//! Code map: [`relay_link`] serves the relay's Deliver stream; [`terminals`]
//! pushes to attached terminals and takes their events; [`subscribers`] hosts
//! the operator's and the terminals' APIs; [`consent`] decides which attributes
//! may leave; [`storage`] is the carrier's own SQLite.
#![forbid(unsafe_code)]

pub mod channels;
pub mod config;
pub mod consent;
pub mod error;
pub mod gateways;
pub mod model;
pub mod packed;
pub mod relay_link;
pub mod storage;
pub mod subscribers;
pub mod terminals;
pub mod web;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1::{carrier_admin_server, carrier_server, subscriber_api_server};
use chukei_proto::clock::Clock;
use chukei_proto::metrics::{Counter, Registry};
use chukei_proto::relay::v1::carrier_ingress_client::CarrierIngressClient;
use chukei_proto::server;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use config::Config;

use crate::storage::Store;
use crate::terminals::TerminalsHandle;

type RelayClient = CarrierIngressClient<InterceptedService<Channel, BearerInterceptor>>;

/// What every carrier handler and worker shares.
#[derive(Clone, Debug)]
pub struct Shared {
    carrier_id: Arc<str>,
    store: Store,
    clock: Clock,
    relay: RelayClient,
    relay_token: Arc<str>,
    admin_token: Arc<str>,
    default_channel: i64,
    report_interval_secs: u64,
    pace_per_sec: u32,
    poll_interval: Duration,
    terminals: TerminalsHandle,
    /// Bumped when receipts are queued: wakes the relay stream.
    outbox_changed: Arc<watch::Sender<u64>>,
    /// Bumped when the relay opens a stream, by stream (main, priority):
    /// older streams of that kind end.
    relay_session: Arc<watch::Sender<[u64; 2]>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    metrics: CarrierMetrics,
    /// The channels a gateway (SMSC, mail server) serves instead of terminals.
    gateways: model::ChannelSet,
    /// How terminals' https:// endpoints are dialled; whether the relay
    /// must present a client certificate naming it.
    tls: chukei_proto::tls::TlsArgs,
}

/// The carrier's Prometheus metrics (labels: channels, never people).
#[derive(Clone, Debug)]
struct CarrierMetrics {
    /// Deliveries received from the relay that were new.
    accepted: Counter,
    /// Messages pushed to terminals, by channel.
    pushed: Counter,
    gateway: gateways::GatewayMetrics,
}

impl CarrierMetrics {
    fn new(registry: &Registry) -> Self {
        Self {
            accepted: registry.counter(
                "chukei_carrier_deliveries_accepted_total",
                "Deliveries received from the relay (duplicates excluded)",
            ),
            pushed: registry.counter(
                "chukei_carrier_messages_pushed_total",
                "Messages pushed to terminals or handed to a gateway, by channel",
            ),
            gateway: gateways::GatewayMetrics::new(registry),
        }
    }
}

/// Runs the carrier on `listener` until `shutdown` resolves.
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
    let cancel = CancellationToken::new();
    let deadline = server::shutdown_deadline(&cancel, config.shutdown_grace());
    let registry = Registry::new();
    let (terminals, endpoints) = TerminalsHandle::new();
    let shared = Shared {
        carrier_id: config.carrier_id.as_str().into(),
        store: store.clone(),
        clock: config.clock.clock(),
        relay: relay_client(&config)?,
        relay_token: config.relay_token.as_str().into(),
        admin_token: config.admin_token.as_str().into(),
        default_channel: config.default_channel()?,
        report_interval_secs: config.report_interval_secs,
        pace_per_sec: config.pace_per_sec,
        poll_interval: Duration::from_millis(config.poll_interval_ms),
        terminals,
        outbox_changed: Arc::new(watch::channel(0).0),
        relay_session: Arc::new(watch::channel([0; 2]).0),
        cancel: cancel.clone(),
        tasks: TaskTracker::new(),
        metrics: CarrierMetrics::new(&registry),
        tls: config.tls.clone(),
        gateways: config.gateways.channels(),
    };
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
        shared.tasks.spawn(chukei_proto::metrics::serve(
            listener,
            registry.clone(),
            cancel.clone(),
        ));
    }
    tracing::info!(carrier_id = %config.carrier_id, addr = %listener.local_addr()?, "carrier starting");

    shared
        .tasks
        .spawn(terminals::run(shared.clone(), endpoints, cancel.clone()));
    shared.tasks.spawn(expiry(shared.clone()));
    let checkpointed = store.clone();
    let turn = store.clone();
    shared.tasks.spawn(server::checkpoints(
        move || turn.writers_ahead_lately(),
        cancel.clone(),
        move || {
            let store = checkpointed.clone();
            async move { store.checkpoint_wal().await }
        },
    ));
    gateways::start(&shared, &config.gateways).await?;
    web::start(&shared, &config.consent_page).await?;

    let router = routes(&config, &registry, &shared).await?;
    let served = server::serve(
        router,
        listener,
        shutdown,
        cancel.clone(),
        config.shutdown_grace(),
    )
    .await;

    cancel.cancel();
    shared.tasks.close();
    if tokio::time::timeout_at(deadline.await?, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("carrier tasks did not stop by the shutdown deadline");
    }
    store.close().await;
    tracing::info!("carrier stopped");
    served
}

/// The relay's `CarrierIngress`, dialled when first called.
fn relay_client(config: &Config) -> anyhow::Result<RelayClient> {
    let channel = config
        .tls
        .endpoint(&config.relay_url)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(
        CarrierIngressClient::with_interceptor(channel, BearerInterceptor::new(&config.token)?)
            .max_encoding_message_size(64 * 1024 * 1024),
    )
}

/// The carrier's ports: the relay's `Deliver` stream, and the subscriber
/// services beside it or, with `--subscriber-listen`, on their own port
/// (served by a task of `shared`'s). Each port's health and reflection speak
/// of exactly the services it serves.
async fn routes(
    config: &Config,
    registry: &Registry,
    shared: &Shared,
) -> anyhow::Result<server::Router> {
    // The subscriber-facing services go on their own listener when one is
    // configured, else beside the relay's Deliver stream. Each port's health
    // and reflection speak of exactly the services it serves.
    let subscriber_listener = match config.subscriber_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "subscriber services listening");
            Some(listener)
        }
        None => None,
    };
    let subscriber_services = |shared: &Shared| {
        (
            subscriber_api_server::SubscriberApiServer::new(subscribers::SubscriberService(
                shared.clone(),
            ))
            .max_decoding_message_size(16 * 1024 * 1024),
            carrier_admin_server::CarrierAdminServer::new(subscribers::AdminService(
                shared.clone(),
            ))
            .max_decoding_message_size(16 * 1024 * 1024),
        )
    };
    const SUBSCRIBER_SERVICES: [&str; 2] = [
        subscriber_api_server::SERVICE_NAME,
        carrier_admin_server::SERVICE_NAME,
    ];
    let base = async |services: &[&str]| -> anyhow::Result<server::Router> {
        let (_, health) = server::health(services).await;
        Ok(
            server::builder(registry, "chukei_carrier_rpc_duration_seconds", &config.tls)?
                .add_service(health)
                .add_service(server::reflection(services)?)
                .add_service(server::reflection_v1alpha(services)?),
        )
    };
    let beside_deliver = subscriber_listener
        .is_none()
        .then(|| subscriber_services(shared));
    let deliver_port: Vec<&str> = std::iter::once(carrier_server::SERVICE_NAME)
        .chain(
            beside_deliver
                .is_some()
                .then_some(SUBSCRIBER_SERVICES)
                .into_iter()
                .flatten(),
        )
        .collect();
    let router = base(&deliver_port)
        .await?
        .add_service(
            carrier_server::CarrierServer::new(relay_link::DeliverService(shared.clone()))
                .max_decoding_message_size(64 * 1024 * 1024),
        )
        .add_optional_service(beside_deliver.as_ref().map(|(api, _)| api.clone()))
        .add_optional_service(beside_deliver.map(|(_, admin)| admin));
    if let Some(listener) = subscriber_listener {
        let (api, admin) = subscriber_services(shared);
        let router = base(&SUBSCRIBER_SERVICES)
            .await?
            .add_service(api)
            .add_service(admin);
        serve_apart(shared, config.shutdown_grace(), router, listener);
    }
    Ok(router)
}

/// Serves the subscriber services' `router` on their own `listener`, on a
/// task of `shared`'s, until the carrier stops.
fn serve_apart(shared: &Shared, grace: Duration, router: server::Router, listener: TcpListener) {
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let stopped = cancel.clone();
        let served = server::serve(
            router,
            listener,
            async move { stopped.cancelled().await },
            cancel,
            grace,
        )
        .await;
        if let Err(error) = served {
            tracing::error!(%error, "subscriber services stopped");
        }
    });
}

/// Holds windowed deliveries for their window's next opening when one closed
/// on them, expires deliveries whose expiry passed before their terminal
/// confirmed them, and trims the receipt outbox of what the relay acked.
async fn expiry(shared: Shared) {
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = tokio::time::sleep(shared.poll_interval * 4) => {}
        }
        match shared.store.roll_windows(shared.clock.now_ms()).await {
            Ok(0) => {}
            Ok(moved) => tracing::info!(
                moved,
                "held deliveries moved to their window's next opening"
            ),
            Err(error) => tracing::warn!(%error, "window roll failed"),
        }
        match shared.store.expire(shared.clock.now_ms()).await {
            Ok(0) => {}
            Ok(expired) => {
                tracing::info!(expired, "deliveries expired");
                shared.outbox_changed.send_modify(|g| *g += 1);
            }
            Err(error) => tracing::warn!(%error, "expiry sweep failed"),
        }
        if let Err(error) = shared.store.trim_outbox().await {
            tracing::warn!(%error, "trimming the receipt outbox failed, will retry");
        }
    }
}
