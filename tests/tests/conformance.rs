//! The conformance kit (`chukei-conformance`) against our own terminal and
//! carrier, against the Python reference terminal an integrator starts from
//! (`docs/integrators/reference_terminal.py`, grpcio's default server
//! behaviour), and against a broken terminal it must fail naming the case.

use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chukei_proto::terminal::v1 as pb;
use integration_tests::binaries::{BinaryHub, CARRIER_ADMIN_TOKEN, DELIVER_TOKEN, Launch};
use integration_tests::process::{Process, free_port, test_binary};
use integration_tests::wait_healthy;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Runs the kit; its report comes back whatever the outcome.
async fn kit(args: Vec<String>, env: &[(&str, &str)]) -> Output {
    let binary = test_binary("chukei-conformance").unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(binary)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The kit passed every case it ran, and ran at least `cases` of them.
fn passed(output: &Output, cases: usize) {
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !report.contains("FAIL"),
        "the kit failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ran = report.lines().filter(|l| l.starts_with("PASS")).count();
    assert!(ran >= cases, "only {ran} cases ran:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminal_sim_passes_the_terminal_cases() {
    let hub = BinaryHub::start(Launch {
        carriers: vec!["alpha"],
        users: 3,
        ..Launch::default()
    })
    .await
    .unwrap();
    // The fleet of seed 42 (Launch's), opening everything at once.
    let output = kit(
        vec![
            "terminal".into(),
            hub.fleet_url.clone(),
            "--user=user-42-0000000".into(),
            "--user=user-42-0000001".into(),
            "--expect-reads".into(),
        ],
        &[],
    )
    .await;
    passed(&output, 9);
    hub.stop().unwrap();
}

/// A carrier started for the kit: its relay URL is the kit's ingress.
struct KitCarrier {
    _dir: tempfile::TempDir,
    process: Process,
    url: String,
    subscriber_url: Option<String>,
    ingress: String,
}

async fn carrier_for_the_kit(split_ports: bool) -> KitCarrier {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let ingress = format!("127.0.0.1:{}", free_port().unwrap());
    let mut command = Command::new(test_binary("carrier-svc").unwrap());
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--carrier-id",
            "kit",
            "--relay-url",
            &format!("http://{ingress}"),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("CHUKEI_CARRIER_TOKEN", "kit-carrier-token-0123456789")
        .env("CHUKEI_CARRIER_RELAY_TOKEN", DELIVER_TOKEN)
        .env("CHUKEI_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let subscriber_url = if split_ports {
        let other = free_port().unwrap();
        command.args(["--subscriber-listen", &format!("127.0.0.1:{other}")]);
        Some(format!("http://127.0.0.1:{other}"))
    } else {
        None
    };
    let process = Process::spawn("carrier-svc", &mut command).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await.unwrap();
    KitCarrier {
        _dir: dir,
        process,
        url,
        subscriber_url,
        ingress,
    }
}

async fn carrier_cases(split_ports: bool) {
    let carrier = carrier_for_the_kit(split_ports).await;
    let mut args = vec![
        "carrier".to_owned(),
        carrier.url.clone(),
        format!("--ingress-listen={}", carrier.ingress),
    ];
    if let Some(url) = &carrier.subscriber_url {
        args.push(format!("--subscriber-url={url}"));
    }
    let output = kit(
        args,
        &[
            ("CHUKEI_CARRIER_RELAY_TOKEN", DELIVER_TOKEN),
            ("CHUKEI_CARRIER_ADMIN_TOKEN", CARRIER_ADMIN_TOKEN),
        ],
    )
    .await;
    passed(&output, if split_ports { 15 } else { 13 });
    carrier.process.terminate(Duration::from_secs(20)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn carrier_svc_passes_the_carrier_cases() {
    carrier_cases(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn carrier_svc_passes_the_carrier_cases_with_the_subscriber_port_apart() {
    carrier_cases(true).await;
}

/// The Python interpreter with grpcio, grpcio-tools, grpcio-health-checking
/// and grpcio-reflection, when the run asks for it (CI does).
const PYTHON_ENV: &str = "CHUKEI_TEST_PYTHON";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_reference_terminal_passes_the_terminal_cases() {
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!("{PYTHON_ENV} is not set: the Python reference terminal check skipped");
        return;
    };
    let port = free_port().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/integrators/reference_terminal.py"
    );
    let terminal = Process::spawn(
        "reference_terminal.py",
        Command::new(&python)
            .arg(script)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await.unwrap();
    let output = kit(vec!["terminal".into(), url, "--expect-reads".into()], &[]).await;
    passed(&output, 9);
    let status = terminal.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "the reference terminal's exit: {status}");
}

/// A terminal that confirms only every second message it is pushed.
#[derive(Clone, Default)]
struct DropsEverySecond(Arc<AtomicU64>);

type Events = Pin<Box<dyn Stream<Item = Result<pb::TerminalEvents, Status>> + Send>>;

#[tonic::async_trait]
impl pb::terminal_server::Terminal for DropsEverySecond {
    type PushStream = Events;

    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<Events>, Status> {
        let mut inbound = request.into_inner();
        let counter = self.0.clone();
        let (sink, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                let events = request
                    .messages
                    .into_iter()
                    .filter(|_| counter.fetch_add(1, Ordering::Relaxed) % 2 == 0)
                    .map(|m| pb::TerminalEvent {
                        delivery_id: m.delivery_id,
                        message_id: m.message_id,
                        user_id: m.user_id,
                        kind: pb::EventKind::Delivered as i32,
                        at: Some(prost_types::Timestamp::default()),
                        ..Default::default()
                    })
                    .collect();
                if sink.send(Ok(pb::TerminalEvents { events })).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(events),
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kit_names_the_case_a_broken_terminal_fails() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::terminal_server::TerminalServer::new(
                DropsEverySecond::default(),
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let output = kit(vec!["terminal".into(), url, "--timeout-secs=2".into()], &[]).await;
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report
            .contains("FAIL  every-message-in-a-push-confirmed: 10 of 20 messages never confirmed"),
        "{report}"
    );
    // It serves neither health nor reflection: both named.
    assert!(report.contains("FAIL  health:"), "{report}");
    assert!(report.contains("FAIL  reflection:"), "{report}");
}
