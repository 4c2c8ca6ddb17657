//! Tracing set-up for every binary, in one place: a `fmt` layer filtered by
//! `RUST_LOG` (default `info`), JSON when `CHUKEI_LOG_FORMAT=json`, and OTLP
//! export of spans when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The returned guard
//! flushes exported spans when dropped.
//!
//! One message is one trace. Its context travels as a W3C `traceparent`: in
//! gRPC metadata on every call ([`crate::auth::BearerInterceptor`] injects it,
//! [`grpc_request_span`] continues it), and inside the records that outlive a
//! call — the relay's message row, each delivery handed to a carrier, each
//! message pushed to a terminal, each terminal event and each receipt — where
//! [`continue_trace`] picks it up and [`traceparent`] passes it on.
//!
//! Logs never carry personal data: no phone numbers, names, attributes,
//! message bodies or credentials.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Flushes and shuts down span export when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether this process exports spans (so trace context is worth carrying).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber for `service_name`, logging at `info` unless
/// `RUST_LOG` says otherwise.
pub fn init(service_name: &'static str) -> anyhow::Result<TelemetryGuard> {
    init_with(service_name, "info")
}

/// [`init`] with another default log filter (a command line logs only warnings).
pub fn init_with(
    service_name: &'static str,
    default_filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("CHUKEI_LOG_FORMAT").is_ok_and(|format| format == "json");
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        _ => None,
    };
    // Spans at `info` and above are exported whatever the log filter says
    // (a command line that logs only warnings still traces its calls).
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(LevelFilter::INFO)
    });
    let registry = tracing_subscriber::registry().with(otel);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()?;
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only on a terminal, never in a file or a pipe.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(filter),
            )
            .try_init()?;
    }
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(TelemetryGuard { provider })
}

/// Whether spans leave this process (OTLP export is configured).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The W3C `traceparent` of `span`: what a record or call carries on. When
/// this process exports nothing, `received` (the context it was given) is
/// passed on unchanged, so a trace stays whole across a hop that is not traced.
pub fn traceparent(span: &tracing::Span, received: &str) -> String {
    if !exporting() {
        return received.to_owned();
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields
        .remove("traceparent")
        .unwrap_or_else(|| received.to_owned())
}

/// Makes `span` a child of the context `traceparent` names (empty or
/// malformed: the span starts its own trace).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if !exporting() || traceparent.is_empty() {
        return;
    }
    let fields = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&fields);
    // Fails only when the span is disabled; then there is nothing to join.
    let _ = span.set_parent(context);
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The server span of one gRPC call, continuing the caller's trace from the
/// `traceparent` header (installed by `server::builder` on every server).
pub fn grpc_request_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        otel.name = request.uri().path(),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    if exporting() {
        let context = TraceContextPropagator::new().extract(&Headers(request.headers()));
        let _ = span.set_parent(context);
    }
    span
}

/// The current span's `traceparent`, for an outgoing call's metadata; `None`
/// when spans are not exported or there is no span.
pub fn outgoing_traceparent() -> Option<String> {
    if !exporting() {
        return None;
    }
    let value = traceparent(&tracing::Span::current(), "");
    (!value.is_empty()).then_some(value)
}

/// Marks one step (`step`, e.g. "relay.hand_over") in the trace of each
/// message a batch of records is about: one span per distinct message id,
/// child of the traceparent its records carry. Returns the traceparent to
/// pass on per message id — empty when spans are not exported, and callers
/// then pass on what they received (see [`passed_on`]).
pub fn step_per_message<'a>(
    step: &'static str,
    records: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> HashMap<String, String> {
    let mut next = HashMap::new();
    if !exporting() {
        return next;
    }
    for (message_id, received) in records {
        if next.contains_key(message_id) {
            continue;
        }
        let span = tracing::info_span!("message step", otel.name = step, message_id);
        continue_trace(&span, received);
        next.insert(message_id.to_owned(), traceparent(&span, received));
    }
    next
}

/// What a record of `message_id` carries on after [`step_per_message`].
pub fn passed_on(next: &HashMap<String, String>, message_id: &str, received: String) -> String {
    next.get(message_id).cloned().unwrap_or(received)
}
