//! The relay's Prometheus metrics: what it accepted, expanded, handed over
//! and heard back, per carrier, and the depth of its queues. Counters are
//! bumped where the work happens; gauges are read from the database when
//! Prometheus scrapes ([`collect_on_scrape`]). Labels name carriers, channels and kinds,
//! never people.

use std::sync::Arc;
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};

use crate::storage::Store;

/// Every metric the relay reports.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    pub registry: Registry,
    /// `target`: refs, all, service, segment.
    pub accepted: Counter,
    pub expanded: Counter,
    pub handed_over: Counter,
    /// `carrier`, `kind`.
    pub receipts: Counter,
    pub reconnects: Counter,
    /// `action`: reoffered, expired.
    pub reconciled: Counter,
    /// REST calls: `route` (the template, never ids), `status`.
    pub http: Histogram,
    /// Webhook POSTs: `outcome` (delivered, failed, disabled).
    pub webhook_attempts: Counter,
    /// Events delivered to webhook endpoints (answered 2xx).
    pub webhook_events: Counter,
    webhook_backlog: Gauge,
    webhook_oldest: Gauge,
    pending: Gauge,
    oldest: Gauge,
    drain: Gauge,
    backlog: Gauge,
    pool: Gauge,
}

impl RelayMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            registry: registry.clone(),
            accepted: registry.counter(
                "chukei_relay_messages_accepted_total",
                "Messages accepted by SendMessage, by target kind",
            ),
            expanded: registry.counter(
                "chukei_relay_recipients_expanded_total",
                "Recipients extracted from campaign targets",
            ),
            handed_over: registry.counter(
                "chukei_relay_deliveries_handed_over_total",
                "Delivery attempts acknowledged by a carrier, by carrier",
            ),
            receipts: registry.counter(
                "chukei_relay_receipts_total",
                "Receipts received from carriers, by carrier and kind (before deduplication)",
            ),
            reconnects: registry.counter(
                "chukei_relay_carrier_stream_reconnects_total",
                "Carrier Deliver streams that ended and were reopened, by carrier",
            ),
            reconciled: registry.counter(
                "chukei_relay_deliveries_reconciled_total",
                "Handed-over deliveries no carrier confirmed: offered again, or expired at the relay, by action",
            ),
            http: registry.histogram(
                "chukei_relay_http_duration_seconds",
                "REST calls by route and HTTP status, from request to response headers (seconds)",
                &LATENCY_BUCKETS,
            ),
            webhook_attempts: registry.counter(
                "chukei_relay_webhook_attempts_total",
                "Webhook POSTs to enterprises' endpoints, by outcome (delivered, failed, disabled)",
            ),
            webhook_events: registry.counter(
                "chukei_relay_webhook_events_delivered_total",
                "Events delivered to webhook endpoints (answered 2xx)",
            ),
            webhook_backlog: registry.gauge(
                "chukei_relay_webhook_batches_waiting",
                "Webhook batches fixed and not yet delivered (enabled endpoints), and the events in them",
            ),
            webhook_oldest: registry.gauge(
                "chukei_relay_webhook_oldest_undelivered_age_seconds",
                "Age of the oldest event in a webhook batch not yet delivered (0: none)",
            ),
            pending: registry.gauge(
                "chukei_relay_deliveries_pending",
                "Deliveries due and not yet handed over, by carrier",
            ),
            oldest: registry.gauge(
                "chukei_relay_deliveries_pending_oldest_age_seconds",
                "Age of the oldest due delivery not yet handed over, by carrier",
            ),
            drain: registry.gauge(
                "chukei_relay_deliveries_drain_seconds",
                "Expected time to hand the pending deliveries over at the carrier's recent rate, by carrier (-1: no recent hand-overs)",
            ),
            backlog: registry.gauge(
                "chukei_relay_rollup_backlog",
                "Events the statistics and billing rollups have yet to fold",
            ),
            pool: registry.gauge(
                "chukei_relay_db_pool_connections",
                "Database pool connections, by state (idle, in_use)",
            ),
        }
    }
}

/// How long a carrier's backlog would take to drain at its recent pace
/// (`None`: no pace measured yet), as the dispatchers estimate it.
pub type DrainEstimate = Arc<dyn Fn(&str, u64) -> Option<Duration> + Send + Sync>;

/// Registers the collector that reads the gauges' values from the
/// database (and the dispatchers' `drain` estimate) at each scrape.
pub fn collect_on_scrape(store: Store, clock: Clock, drain: DrainEstimate, metrics: RelayMetrics) {
    let registry = metrics.registry.clone();
    registry.on_scrape(Arc::new(move || {
        let (store, clock, drain, metrics) =
            (store.clone(), clock.clone(), drain.clone(), metrics.clone());
        Box::pin(async move { metrics.refresh(&store, &clock, &*drain).await })
    }));
}

impl RelayMetrics {
    async fn refresh(
        &self,
        store: &Store,
        clock: &Clock,
        drain: &(dyn Fn(&str, u64) -> Option<Duration> + Send + Sync),
    ) {
        let now = clock.now_ms();
        match store.pending_by_carrier(now).await {
            Ok(rows) => {
                for (carrier, count, oldest) in rows {
                    let labels = [("carrier", carrier.as_str())];
                    self.pending.set(&labels, count as f64);
                    let age = oldest.map_or(0, |due| (now - due).max(0));
                    self.oldest.set(&labels, age as f64 / 1000.0);
                    let drain = match count {
                        0 => Some(0.0),
                        _ => drain(&carrier, count).map(|d| d.as_secs_f64()),
                    };
                    self.drain.set(&labels, drain.unwrap_or(-1.0));
                }
            }
            Err(error) => tracing::warn!(%error, "reading queue depths failed"),
        }
        if let Ok(backlog) = store.roll_up_backlog().await {
            self.backlog.set(&[], backlog as f64);
        }
        if let Ok((batches, events, oldest)) = store.webhook_backlog().await {
            self.webhook_backlog
                .set(&[("unit", "batches")], batches as f64);
            self.webhook_backlog
                .set(&[("unit", "events")], events as f64);
            let age = oldest.map_or(0, |at| (now - at).max(0));
            self.webhook_oldest.set(&[], age as f64 / 1000.0);
        }
        let (size, idle) = store.pool_connections();
        self.pool.set(&[("state", "idle")], idle as f64);
        self.pool.set(
            &[("state", "in_use")],
            (size as usize).saturating_sub(idle) as f64,
        );
    }
}
