//! SMS through a real SMS gateway: the carrier binds to Jasmin 0.11.0's SMPP
//! server as an ESME; Jasmin routes over its SMPP client connectors to a
//! downstream SMSC (`tests/python/smsc.py`) that takes each part and
//! issues a delivery receipt, which Jasmin maps back and sends the carrier
//! as a `deliver_sm`. A long Japanese text goes to more than 10,000
//! subscribers; the carrier process is killed with SIGKILL midway and
//! started again. Every message is counted exactly once as delivered at
//! the relay, and every subscriber's text arrives whole at the downstream
//! SMSC (its UCS-2 parts put back together).
//!
//! Needs `CHUKEI_TEST_JASMIN` (the `jasmind.py` of a venv with
//! `jasmin==0.11.0`, as `.ci/run` installs), `CHUKEI_TEST_PYTHON`, and
//! RabbitMQ and Redis on their default local ports; without the variables
//! it says so and does nothing. The relay runs on SQLite: the subject is the
//! carrier, whose database is its own SQLite either way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::binaries::{BinaryHub, Launch};
use integration_tests::peers::{helper, lines, listening, python, start_jasmin, texts_by_number};
use integration_tests::process::free_port;
use integration_tests::{init_logs, registered_users, send_request};
use terminal_sim::fleet::Fleet;

const JASMIN_ENV: &str = "CHUKEI_TEST_JASMIN";
const USERS: usize = 13_500;
const SEED: u64 = 42;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_sms_through_jasmin_counted_once_across_a_carrier_sigkill() {
    init_logs();
    let Some(jasmind) = std::env::var_os(JASMIN_ENV).map(PathBuf::from) else {
        eprintln!("{JASMIN_ENV} unset: the Jasmin test is skipped");
        return;
    };
    let Some(python) = python("the Jasmin test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("downstream.jsonl");
    let smsc_port = free_port().unwrap();
    let _downstream = helper(
        &python,
        "smsc.py",
        &[
            "--port".into(),
            smsc_port.to_string(),
            "--ids".into(),
            "dec".into(),
            // Jasmin looks its receipts up by the id it was answered; one
            // that comes too soon is retried only ten seconds later.
            "--receipt-delay".into(),
            "1.0".into(),
            "--record".into(),
            record.display().to_string(),
        ],
    );
    listening(smsc_port, Duration::from_secs(30)).await;

    let smpp_port = free_port().unwrap();
    let jasmin = start_jasmin(
        &python,
        &jasmind,
        &dir.path().join("jasmin"),
        smpp_port,
        smsc_port,
        8,
    )
    .await
    .unwrap();

    let mut hub = BinaryHub::start(Launch {
        carriers: vec!["alpha"],
        users: USERS,
        seed: SEED,
        carrier_args: vec![
            "--smpp-url".into(),
            format!("smpp://127.0.0.1:{smpp_port}"),
            "--smpp-system-id".into(),
            "carrier".into(),
            "--smpp-password".into(),
            "secret".into(),
            "--smpp-window".into(),
            "32".into(),
        ],
        logs: std::env::var_os("CHUKEI_TEST_LOGS").map(PathBuf::from),
        ..Launch::default()
    })
    .await
    .unwrap();
    let fleet = Fleet::generate(SEED, USERS, &["alpha".into()]);
    let registered = registered_users(&fleet, &hub.enterprise.enterprise_id);
    assert!(
        registered.len() >= 10_000,
        "{} registered",
        registered.len()
    );

    let text = "【秋の特売】会員の皆様へ：本日から一週間、全商品を二割引でご提供いたします。店頭でこのメッセージをご提示ください。Autumn sale: 20% off all week for members.";
    let channel = tonic::transport::Channel::from_shared(hub.relay_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut enterprise = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel,
        BearerInterceptor::new(&hub.enterprise.api_key).unwrap(),
    );
    let started = Instant::now();
    let message_id = enterprise
        .send_message(send_request(
            "autumn",
            pb::target::Kind::AllRegistered(true),
            text,
            common::Channel::Sms,
        ))
        .await
        .unwrap()
        .into_inner()
        .message_id;

    // Midway: a third of the parts downstream, then SIGKILL.
    let parts = registered.len() * 2;
    wait_until(Duration::from_secs(600), || {
        lines(&record).len() >= parts / 3
    })
    .await;
    hub.kill_and_restart_carrier(0, Duration::from_secs(1))
        .await
        .unwrap();

    let mut status_of = async || {
        enterprise
            .get_message(pb::GetMessageRequest {
                message_id: message_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let status = loop {
        let status = status_of().await;
        if status.matched > 0 && status.delivered == status.matched {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not all delivered within 15 minutes: {status:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let elapsed = started.elapsed();
    assert_eq!(status.matched as usize, registered.len());
    assert_eq!(status.handed_over, status.matched);
    assert_eq!(status.failed, 0);
    // Receipts still in flight would only find deliveries already counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = status_of().await;
    assert_eq!(again.delivered, status.matched, "counted exactly once");

    let texts = texts_by_number(&record);
    for user in registered.values() {
        let number = user.phone_number.trim_start_matches('+');
        let got = texts.get(number).map(Vec::as_slice).unwrap_or_default();
        assert!(
            got.iter().any(|t| t == text),
            "{} did not get the text whole: {got:?}",
            user.user_id
        );
    }
    eprintln!(
        "jasmin: {} SMS of 2 parts delivered and counted in {:.1} s ({:.0}/s), {} parts downstream (duplicates after the kill included)",
        status.matched,
        elapsed.as_secs_f64(),
        status.matched as f64 / elapsed.as_secs_f64(),
        lines(&record).len(),
    );
    hub.stop().unwrap();
    jasmin.terminate(Duration::from_secs(20)).unwrap();
}

async fn wait_until(within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
