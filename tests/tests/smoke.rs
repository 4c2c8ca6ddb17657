//! Smoke test of the real binaries: relay-svc, carrier-svc and terminal-sim as
//! processes, driven by the enterprise-cli binary; each shuts down cleanly on
//! SIGTERM.

use std::process::Command;

use integration_tests::binaries::{BinaryHub, Launch};
use integration_tests::process::test_binary;
use integration_tests::{Backend, backend_tests, drop_postgres_database, postgres_database};

fn binary(name: &str) -> std::path::PathBuf {
    test_binary(name).unwrap()
}

fn cli(relay: &str, key: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("enterprise-cli"))
        .args(["--relay-url", relay, "--json"])
        .args(args)
        .env("CHUKEI_API_KEY", key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "enterprise-cli {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

async fn the_real_binaries_relay_a_broadcast(backend: Backend) {
    let postgres = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => match postgres_database().await.unwrap() {
            Some(database) => Some(database),
            None => return,
        },
    };
    let hub = BinaryHub::start(Launch {
        database_url: postgres.as_ref().map(|(url, _)| url.clone()),
        ..Launch::default()
    })
    .await
    .unwrap();
    let (relay_url, enterprise) = (hub.relay_url.clone(), hub.enterprise.clone());

    let registrations = cli(
        &relay_url,
        &enterprise.api_key,
        &["registrations", "--all-pages", "--page-size", "50"],
    );
    let registered = registrations["registrations"].as_array().unwrap().len();
    assert!(registered > 100, "the fleet registered {registered} users");

    let sent = cli(
        &relay_url,
        &enterprise.api_key,
        &["send", "--all", "--text", "smoke test"],
    );
    let message_id = sent["message_id"].as_str().unwrap().to_owned();
    let status = cli(
        &relay_url,
        &enterprise.api_key,
        &["status", &message_id, "--watch", "--interval-ms", "100"],
    );
    assert_eq!(status["matched"].as_u64().unwrap() as usize, registered);
    assert_eq!(status["delivered"], status["matched"]);
    assert_eq!(status["state"], "handed-over");

    // Delivery control through the command line: a fallback policy inside a
    // daily window that is always open, then the decision trace for one ref.
    let first_ref = registrations["registrations"][0]["user_ref"]
        .as_str()
        .unwrap()
        .to_owned();
    let sent = cli(
        &relay_url,
        &enterprise.api_key,
        &[
            "send",
            "--text",
            "controlled",
            "--policy",
            "fallback",
            "--channels",
            "sms,rcs",
            "--timeout",
            "2h",
            "--window",
            "00:00-23:59",
            "--zone",
            "Asia/Tokyo",
            "--priority",
            "high",
            &first_ref,
        ],
    );
    let controlled = sent["message_id"].as_str().unwrap().to_owned();
    let status = cli(
        &relay_url,
        &enterprise.api_key,
        &["status", &controlled, "--watch", "--interval-ms", "100"],
    );
    assert_eq!(status["delivered"], 1);
    assert!(
        status["plan"]
            .as_str()
            .unwrap()
            .starts_with("fallback SMS → RCS after 2h; window daily 00:00-23:59 Asia/Tokyo"),
        "{status}"
    );
    let trace = cli(
        &relay_url,
        &enterprise.api_key,
        &["explain", &controlled, &first_ref],
    );
    assert_eq!(trace["attempts"][0]["channel"], "sms");
    assert_eq!(trace["attempts"][0]["state"], "handed_over");
    assert!(
        !trace.to_string().contains("carrier"),
        "no carrier in the enterprise's view: {trace}"
    );
    // A bad window is refused by the relay with the field named.
    let refused = Command::new(binary("enterprise-cli"))
        .args([
            "--relay-url",
            &relay_url,
            "send",
            "--text",
            "x",
            "--window",
            "09:00-10:00",
        ])
        .args(["--zone", "Mars/Base", &first_ref])
        .env("CHUKEI_API_KEY", &enterprise.api_key)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("window.daily.time_zone"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    for (name, status) in hub.stop().unwrap() {
        assert!(status.success(), "{name} exits cleanly on SIGTERM");
    }
    if let Some((_, name)) = postgres {
        drop_postgres_database(&name).await.unwrap();
    }
}

backend_tests!(the_real_binaries_relay_a_broadcast);
