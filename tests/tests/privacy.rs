//! Nothing personal in logs: the real binaries (relay, two carriers, a fleet)
//! log at `debug` — every crate — while the fleet provisions subscribers with
//! phone numbers, names, birth dates, e-mail addresses and SNS handles,
//! registers with consented attributes (a fifth then withdraw), and enterprise-cli sends targeted,
//! segment and broadcast messages with distinctive bodies; then no log line of
//! any process may contain any of those values.

use std::process::Command;
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1 as pb;
use integration_tests::binaries::{BinaryHub, Launch};
use integration_tests::eventually;
use integration_tests::process::test_binary;
use terminal_sim::fleet::Fleet;

const SEED: u64 = 31;
const CARRIERS: [&str; 2] = ["alpha", "beta"];
const USERS: usize = 150;
const BODIES: [&str; 3] = [
    "Sakura Mart: your prescription #PX-55821 is ready",
    "Only for you, Haruka-san: 20% off until Sunday",
    "Kaze Bank card ending 4417 was used in Osaka",
];

fn cli(relay: &str, key: &str, args: &[&str], log: &std::path::Path) -> String {
    let output = Command::new(test_binary("enterprise-cli").unwrap())
        .args(["--relay-url", relay, "--json"])
        .args(args)
        .env("CHUKEI_API_KEY", key)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "enterprise-cli {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap()
        .write_all(&output.stderr)
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_log_line_of_any_process_holds_personal_data() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let hub = BinaryHub::start(Launch {
        carriers: CARRIERS.to_vec(),
        users: USERS,
        seed: SEED,
        relay_args: vec!["--min-cohort".into(), "1".into()],
        carrier_args: vec!["--report-interval-secs".into(), "1".into()],
        // A fifth of the people withdraw their consent: that path logs too.
        fleet_args: vec!["--withdraw-share".into(), "0.2".into()],
        env: vec![("RUST_LOG".into(), "debug".into())],
        logs: Some(logs.clone()),
        ..Launch::default()
    })
    .await
    .unwrap();
    let (relay_url, enterprise) = (hub.relay_url.clone(), hub.enterprise.clone());

    // The enterprise's traffic: a targeted message, a segment, a broadcast;
    // its statistics by attribute and place; its registrations.
    let key = &enterprise.api_key;
    let log = logs.join("enterprise-cli.log");
    let registrations: serde_json::Value = serde_json::from_str(
        cli(
            &relay_url,
            key,
            &["registrations", "--page-size", "5"],
            &log,
        )
        .lines()
        .last()
        .unwrap(),
    )
    .unwrap();
    let first_ref = registrations["registrations"][0]["user_ref"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut sent = Vec::new();
    for args in [
        vec!["send", "--text", BODIES[0], &first_ref],
        vec!["send", "--text", BODIES[1], "--segment", "age=0-120"],
        vec![
            "send",
            "--text",
            BODIES[2],
            "--all",
            "--channels",
            "sms,rcs",
            "--policy",
            "fallback",
            "--timeout",
            "1h",
        ],
    ] {
        let out = cli(&relay_url, key, &args, &log);
        let response: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap()).unwrap();
        sent.push(response["message_id"].as_str().unwrap().to_owned());
    }
    let channel = tonic::transport::Channel::from_shared(relay_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel,
        BearerInterceptor::new(key).unwrap(),
    );
    for message_id in &sent {
        eventually("the message opened", Duration::from_secs(60), || {
            let (mut client, message_id) = (client.clone(), message_id.clone());
            async move {
                let status = client
                    .get_message(pb::GetMessageRequest { message_id })
                    .await
                    .ok()?
                    .into_inner();
                (status.matched > 0 && status.opened == status.matched).then_some(())
            }
        })
        .await;
    }
    cli(
        &relay_url,
        key,
        &["stats", "--by", "region,age,gender"],
        &log,
    );
    cli(&relay_url, key, &["stats", "--by", "place,hour"], &log);
    cli(&relay_url, key, &["explain", &sent[0], &first_ref], &log);

    hub.stop().unwrap();

    // What must never be logged.
    let fleet = Fleet::generate(SEED, USERS, &CARRIERS.map(String::from));
    let mut personal: Vec<(&str, String)> = BODIES
        .iter()
        .map(|b| ("message body", b.to_string()))
        .collect();
    for user in &fleet.users {
        personal.push(("phone number", user.phone_number.clone()));
        personal.push(("name", user.name.clone()));
        personal.push(("birth date", user.birth_date.clone()));
        if !user.email.is_empty() {
            personal.push(("e-mail", user.email.clone()));
        }
        if !user.sns_handle.is_empty() {
            personal.push(("SNS handle", user.sns_handle.clone()));
        }
        if user.home_region.contains('/') {
            personal.push(("region", user.home_region.clone()));
        }
    }
    let mut lines = 0;
    for entry in std::fs::read_dir(&logs).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        lines += text.lines().count();
        for line in text.lines() {
            for (what, value) in &personal {
                assert!(
                    !line.contains(value.as_str()),
                    "{}: a {what} in a log line: {line}",
                    path.display()
                );
            }
        }
    }
    assert!(
        lines > 1_000,
        "only {lines} log lines: is debug logging on?"
    );
}
