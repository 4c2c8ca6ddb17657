//! Smoke test of the real binaries: relay-svc, carrier-svc and terminal-sim as
//! processes, driven by the enterprise-cli binary; each shuts down cleanly on
//! SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::relay::v1 as pb;
use integration_tests::process::{self, Process, test_binary};
use integration_tests::{
    Backend, backend_tests, drop_postgres_database, postgres_database, wait_healthy,
};

const GRACE: Duration = Duration::from_secs(20);

fn binary(name: &str) -> std::path::PathBuf {
    test_binary(name).unwrap()
}

fn free_port() -> u16 {
    process::free_port().unwrap()
}

/// Starts a service binary with its output discarded.
fn spawn(name: &str, command: &mut Command) -> Process {
    Process::spawn(name, command.stdout(Stdio::null()).stderr(Stdio::null())).unwrap()
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
    let dir = tempfile::tempdir().unwrap();
    let postgres = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => match postgres_database().await.unwrap() {
            Some(database) => Some(database),
            None => return,
        },
    };
    let admin_token = "smoke-admin-token-0123456789";
    let deliver_token = "smoke-deliver-token-0123456789";
    let carrier_admin = "smoke-carrier-admin-0123456789";
    let relay_port = free_port();
    let relay_url = format!("http://127.0.0.1:{relay_port}");
    let relay = spawn(
        "relay-svc",
        Command::new(binary("relay-svc"))
            .args(["--listen", &format!("127.0.0.1:{relay_port}")])
            .arg("--data-dir")
            .arg(dir.path().join("relay"))
            .args(
                postgres
                    .iter()
                    .flat_map(|(url, _)| ["--database-url", url.as_str()]),
            )
            .env("CHUKEI_RELAY_ADMIN_TOKEN", admin_token)
            .env("CHUKEI_RELAY_DELIVER_TOKEN", deliver_token),
    );
    wait_healthy(&relay_url).await.unwrap();

    let channel = tonic::transport::Channel::from_shared(relay_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel,
        BearerInterceptor::new(admin_token).unwrap(),
    );
    let enterprise = admin
        .create_enterprise(pb::CreateEnterpriseRequest {
            name: "smoke".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut carriers = Vec::new();
    let mut carrier_flags = Vec::new();
    for carrier_id in ["alpha", "beta"] {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let token = format!("smoke-{carrier_id}-token-0123456789");
        carriers.push(spawn(
            carrier_id,
            Command::new(binary("carrier-svc"))
                .args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--carrier-id",
                    carrier_id,
                    "--relay-url",
                    &relay_url,
                ])
                .arg("--data-dir")
                .arg(dir.path().join(carrier_id))
                .env("CHUKEI_CARRIER_TOKEN", &token)
                .env("CHUKEI_CARRIER_RELAY_TOKEN", deliver_token)
                .env("CHUKEI_CARRIER_ADMIN_TOKEN", carrier_admin),
        ));
        wait_healthy(&url).await.unwrap();
        admin
            .register_carrier(pb::RegisterCarrierRequest {
                carrier_id: carrier_id.into(),
                endpoint: url.clone(),
                token,
            })
            .await
            .unwrap();
        carrier_flags.push(format!("--carrier={carrier_id}={url}"));
    }

    let fleet_port = free_port();
    let fleet = spawn(
        "terminal-sim",
        Command::new(binary("terminal-sim"))
            .args([
                "--listen",
                &format!("127.0.0.1:{fleet_port}"),
                "fleet",
                "--users",
                "300",
                "--open-mode",
                "always",
            ])
            .args(&carrier_flags)
            .args(["--enterprise", &enterprise.enterprise_id])
            .env("CHUKEI_TERMINAL_CARRIER_ADMIN_TOKEN", carrier_admin),
    );
    wait_healthy(&format!("http://127.0.0.1:{fleet_port}"))
        .await
        .unwrap();

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

    assert!(
        fleet.terminate(GRACE).unwrap().success(),
        "terminal-sim exits cleanly on SIGTERM"
    );
    for carrier in carriers {
        assert!(
            carrier.terminate(GRACE).unwrap().success(),
            "carrier-svc exits cleanly on SIGTERM"
        );
    }
    assert!(
        relay.terminate(GRACE).unwrap().success(),
        "relay-svc exits cleanly on SIGTERM"
    );
    if let Some((_, name)) = postgres {
        drop_postgres_database(&name).await.unwrap();
    }
}

backend_tests!(the_real_binaries_relay_a_broadcast);
