//! One message is one trace: the real binaries export spans over OTLP to a
//! small collector run here (a tonic server of the collector's TraceService),
//! and the spans of one message — the enterprise-cli call, the relay's
//! acceptance, hand-over and receipt, the carrier's acceptance, push and
//! receipt, the terminal's receipt and read — share one trace id, carried in
//! gRPC metadata and inside the delivery records, pushes, events and receipts.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1 as pb;
use integration_tests::binaries::{BinaryHub, Launch};
use integration_tests::eventually;
use integration_tests::process::test_binary;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;

/// A received span: the exporting service, its trace id (hex) and name.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    name: String,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Received {
                        service: service.clone(),
                        trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                        name: span.name,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_is_one_trace_across_all_four_processes() {
    one_trace(true).await;
}

/// A hop that exports nothing (here the carrier) still passes the trace on:
/// the terminal's spans join the relay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hop_that_is_not_traced_passes_the_trace_on() {
    one_trace(false).await;
}

async fn one_trace(carrier_exports: bool) {
    let collector = Collector::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_url = format!("http://{}", otlp.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );

    let exporting = |endpoint: &str| {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                endpoint.to_owned(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ]
    };
    let hub = BinaryHub::start(Launch {
        carriers: vec!["alpha"],
        users: 20,
        env: exporting(&otlp_url),
        carrier_env: if carrier_exports {
            Vec::new()
        } else {
            exporting("")
        },
        ..Launch::default()
    })
    .await
    .unwrap();
    let (relay_url, enterprise) = (hub.relay_url.clone(), hub.enterprise.clone());
    let channel = tonic::transport::Channel::from_shared(relay_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel,
        BearerInterceptor::new(&enterprise.api_key).unwrap(),
    );
    let user_ref = client
        .list_registrations(pb::ListRegistrationsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .registrations[0]
        .user_ref
        .clone();

    // The message, sent by the enterprise's command line.
    let output = Command::new(test_binary("enterprise-cli").unwrap())
        .args([
            "--relay-url",
            &relay_url,
            "--json",
            "send",
            "--text",
            "traced",
        ])
        .arg(&user_ref)
        .env("CHUKEI_API_KEY", &enterprise.api_key)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp_url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let message_id = sent["message_id"].as_str().unwrap().to_owned();
    eventually("the message opened", Duration::from_secs(30), || {
        let mut client = client.clone();
        let message_id = message_id.clone();
        async move {
            let status = client
                .get_message(pb::GetMessageRequest { message_id })
                .await
                .ok()?
                .into_inner();
            (status.opened == 1).then_some(())
        }
    })
    .await;

    // Graceful stops flush what each process still holds.
    hub.stop().unwrap();
    let spans = collector.0.lock().unwrap().clone();
    server.abort();

    let root = spans
        .iter()
        .find(|s| s.service == "enterprise-cli")
        .unwrap_or_else(|| panic!("no span from enterprise-cli: {spans:?}"));
    let mut names: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for span in spans.iter().filter(|s| s.trace_id == root.trace_id) {
        names
            .entry(span.service.as_str())
            .or_default()
            .insert(span.name.as_str());
    }
    let expected: &[(&str, &[&str])] = &[
        ("enterprise-cli", &["send"]),
        (
            "relay-svc",
            &[
                "/chukei.relay.v1.EnterpriseApi/SendMessage",
                "relay.hand_over",
                "relay.receipt",
            ],
        ),
        (
            "carrier-svc",
            &["carrier.accept", "carrier.push", "carrier.receipt"],
        ),
        ("terminal-sim", &["terminal.receive", "terminal.read"]),
    ];
    for (service, steps) in expected {
        if *service == "carrier-svc" && !carrier_exports {
            assert!(!names.contains_key(service), "{names:?}");
            continue;
        }
        let seen = names.get(service).cloned().unwrap_or_default();
        for step in *steps {
            assert!(
                seen.contains(step),
                "{service} has no {step:?} span in the message's trace {}; it has {seen:?} (all: {names:?})",
                root.trace_id
            );
        }
    }
}
