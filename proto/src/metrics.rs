//! Prometheus metrics for every process: a small registry of labelled
//! counters, gauges and histograms rendered in the text exposition format
//! (0.0.4), a tower layer timing every gRPC call, and the HTTP endpoint
//! (`GET /metrics`) that serves them on the `--metrics-listen` address.
//!
//! Labels carry only operational names (carrier ids, channels, kinds, RPC
//! methods, status codes) — never a person, a message body or a credential.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs of one series, in a fixed order.
type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Series {
    value: f64,
    /// Histograms: cumulative counts per bucket, and the sum.
    buckets: Vec<u64>,
    sum: f64,
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    bounds: Vec<f64>,
    series: BTreeMap<Labels, Series>,
}

/// Refreshes gauges from their source just before a scrape renders them.
pub type Collector = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The metrics of one process; cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
    collectors: Arc<Mutex<Vec<Collector>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A counter family: only goes up.
#[derive(Clone, Debug)]
pub struct Counter {
    registry: Registry,
    name: &'static str,
}

/// A gauge family: set to the current value.
#[derive(Clone, Debug)]
pub struct Gauge {
    registry: Registry,
    name: &'static str,
}

/// A histogram family with fixed bucket bounds.
#[derive(Clone, Debug)]
pub struct Histogram {
    registry: Registry,
    name: &'static str,
}

/// Bucket bounds for latencies in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&self, name: &'static str, help: &'static str, kind: Kind, bounds: &[f64]) {
        let mut families = self.families.lock().expect("metrics lock");
        families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            bounds: bounds.to_vec(),
            series: BTreeMap::new(),
        });
    }

    /// Registers (or finds) counter `name`; names end in `_total`.
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.family(name, help, Kind::Counter, &[]);
        Counter {
            registry: self.clone(),
            name,
        }
    }

    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.family(name, help, Kind::Gauge, &[]);
        Gauge {
            registry: self.clone(),
            name,
        }
    }

    pub fn histogram(&self, name: &'static str, help: &'static str, bounds: &[f64]) -> Histogram {
        self.family(name, help, Kind::Histogram, bounds);
        Histogram {
            registry: self.clone(),
            name,
        }
    }

    fn update(
        &self,
        name: &'static str,
        pairs: &[(&'static str, &str)],
        f: impl FnOnce(&mut Series, &[f64]),
    ) {
        let mut families = self.families.lock().expect("metrics lock");
        if let Some(Family { bounds, series, .. }) = families.get_mut(name) {
            let series = series.entry(labels(pairs)).or_insert_with(|| Series {
                buckets: vec![0; bounds.len()],
                ..Series::default()
            });
            f(series, bounds);
        }
    }

    /// Runs `collector` before every scrape (e.g. to read queue depths).
    pub fn on_scrape(&self, collector: Collector) {
        self.collectors
            .lock()
            .expect("metrics lock")
            .push(collector);
    }

    /// Runs the collectors, then renders.
    pub async fn scrape(&self) -> String {
        let collectors: Vec<Collector> = self.collectors.lock().expect("metrics lock").clone();
        for collector in collectors {
            collector().await;
        }
        self.render()
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let families = self.families.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.name());
            for (labels, series) in &family.series {
                match family.kind {
                    Kind::Counter | Kind::Gauge => {
                        let _ = writeln!(
                            out,
                            "{name}{} {}",
                            render_labels(labels, None),
                            number(series.value)
                        );
                    }
                    Kind::Histogram => {
                        for (bound, count) in family.bounds.iter().zip(&series.buckets) {
                            let le = number(*bound);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {count}",
                                render_labels(labels, Some(&le))
                            );
                        }
                        let count = series.value as u64;
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            render_labels(labels, Some("+Inf"))
                        );
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            render_labels(labels, None),
                            number(series.sum)
                        );
                        let _ =
                            writeln!(out, "{name}_count{} {count}", render_labels(labels, None));
                    }
                }
            }
        }
        out
    }
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn render_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(key, value)| {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{key}=\"{escaped}\"")
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Counter {
    pub fn add(&self, labels: &[(&'static str, &str)], by: u64) {
        self.registry
            .update(self.name, labels, |s, _| s.value += by as f64);
    }

    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        self.add(labels, 1);
    }
}

impl Gauge {
    pub fn set(&self, labels: &[(&'static str, &str)], value: f64) {
        self.registry
            .update(self.name, labels, |s, _| s.value = value);
    }
}

impl Histogram {
    pub fn observe(&self, labels: &[(&'static str, &str)], value: f64) {
        self.registry.update(self.name, labels, |s, bounds| {
            s.value += 1.0;
            s.sum += value;
            for (bound, count) in bounds.iter().zip(s.buckets.iter_mut()) {
                if value <= *bound {
                    *count += 1;
                }
            }
        });
    }
}

/// Serves `GET /metrics` from `registry` on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, registry: Registry, cancel: CancellationToken) {
    crate::http::serve(listener, cancel, move |request: crate::http::Request| {
        let registry = registry.clone();
        async move {
            if request.uri().path() == "/metrics" {
                crate::http::response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    registry.scrape().await,
                )
            } else {
                crate::http::response(404, "text/plain", "not found\n")
            }
        }
    })
    .await
}

/// A tower layer that times every gRPC call into
/// `<prefix>_rpc_duration_seconds{method, code}`.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    histogram: Histogram,
}

impl RpcMetricsLayer {
    pub fn new(registry: &Registry, name: &'static str) -> Self {
        Self {
            histogram: registry.histogram(
                name,
                "gRPC calls by method and status code, from request to response headers (seconds)",
                &LATENCY_BUCKETS,
            ),
        }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            histogram: self.histogram.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
    histogram: Histogram,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Other HTTP beside gRPC on the port (the relay's REST edge) times
        // itself by route; its paths carry ids, not method names.
        let grpc = request
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let method = request.uri().path().to_owned();
        let histogram = self.histogram.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            if !grpc {
                return response;
            }
            // A unary error travels in the headers (trailers-only); streams and
            // successes carry their status in trailers, counted here as OK.
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            // Streams stay open for their lifetime; only calls that end are timed.
            let elapsed: Duration = started.elapsed();
            histogram.observe(
                &[("method", &method), ("code", &code)],
                elapsed.as_secs_f64(),
            );
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let registry = Registry::new();
        let sent = registry.counter("x_sent_total", "Things sent");
        sent.add(&[("carrier", "a\"b")], 2);
        sent.inc(&[("carrier", "a\"b")]);
        registry.gauge("x_depth", "Queue depth").set(&[], 4.5);
        let latency = registry.histogram("x_seconds", "Latency", &[0.1, 1.0]);
        latency.observe(&[("method", "/m")], 0.05);
        latency.observe(&[("method", "/m")], 0.5);
        latency.observe(&[("method", "/m")], 5.0);
        assert_eq!(
            registry.render(),
            "# HELP x_depth Queue depth\n\
             # TYPE x_depth gauge\n\
             x_depth 4.5\n\
             # HELP x_seconds Latency\n\
             # TYPE x_seconds histogram\n\
             x_seconds_bucket{method=\"/m\",le=\"0.1\"} 1\n\
             x_seconds_bucket{method=\"/m\",le=\"1\"} 2\n\
             x_seconds_bucket{method=\"/m\",le=\"+Inf\"} 3\n\
             x_seconds_sum{method=\"/m\"} 5.55\n\
             x_seconds_count{method=\"/m\"} 3\n\
             # HELP x_sent_total Things sent\n\
             # TYPE x_sent_total counter\n\
             x_sent_total{carrier=\"a\\\"b\"} 3\n"
        );
    }
}
