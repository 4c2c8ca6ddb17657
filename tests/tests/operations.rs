//! Standard gRPC tooling against the running services: reflection answers
//! over both `grpc.reflection.v1` and the older `v1alpha` (which many tools
//! still speak) and lists every service a server hosts — to our own client
//! and, when `CHUKEI_TEST_PYTHON` names a Python with grpcio-reflection (CI
//! installs it), to the reference Python client.

use integration_tests::process::test_binary;
use integration_tests::{Backend, Hub};
use tonic_reflection::pb::{v1, v1alpha};

/// The services `url` lists through reflection, over v1 and over v1alpha.
async fn listed(url: &str) -> (Vec<String>, Vec<String>) {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1: not a service list: {response:?}");
    };
    let v1_names = list.service.into_iter().map(|s| s.name).collect();

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1alpha: not a service list: {response:?}");
    };
    (v1_names, list.service.into_iter().map(|s| s.name).collect())
}

/// What a port says of `service` over gRPC health: `Some(SERVING)` …, or
/// `None` for NOT_FOUND (a service it does not serve).
async fn health_of(url: &str, service: &str) -> Option<i32> {
    use chukei_proto::health::{HealthCheckRequest, HealthClient};
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
    {
        Ok(response) => Some(response.into_inner().status),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("{url} health of {service}: {status:?}"),
    }
}

/// Whether `url` really answers `service`: one call to one of its methods,
/// with no credentials and an empty request, is anything but UNIMPLEMENTED
/// (a refusal for want of a token is an answer).
async fn answers(url: &str, service: &str) -> bool {
    use chukei_proto::carrier::v1 as carrier;
    use chukei_proto::relay::v1 as relay;
    use chukei_proto::terminal::v1 as terminal;
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = match service {
        "chukei.relay.v1.EnterpriseApi" => {
            relay::enterprise_api_client::EnterpriseApiClient::new(channel)
                .get_message(relay::GetMessageRequest::default())
                .await
                .err()
        }
        "chukei.relay.v1.CarrierIngress" => {
            relay::carrier_ingress_client::CarrierIngressClient::new(channel)
                .upsert_contracts(relay::UpsertContractsRequest::default())
                .await
                .err()
        }
        "chukei.relay.v1.Admin" => relay::admin_client::AdminClient::new(channel)
            .list_api_keys(relay::ListApiKeysRequest::default())
            .await
            .err(),
        "chukei.carrier.v1.Carrier" => carrier::carrier_client::CarrierClient::new(channel)
            .deliver(tokio_stream::iter(Vec::<carrier::RelayToCarrier>::new()))
            .await
            .err(),
        "chukei.carrier.v1.SubscriberApi" => {
            carrier::subscriber_api_client::SubscriberApiClient::new(channel)
                .attach(carrier::AttachRequest::default())
                .await
                .err()
        }
        "chukei.carrier.v1.CarrierAdmin" => {
            carrier::carrier_admin_client::CarrierAdminClient::new(channel)
                .get_counts(carrier::GetCountsRequest::default())
                .await
                .err()
        }
        "chukei.terminal.v1.Terminal" => terminal::terminal_client::TerminalClient::new(channel)
            .push(tokio_stream::iter(Vec::<terminal::PushRequest>::new()))
            .await
            .err(),
        other => panic!("no probe for {other}"),
    };
    !refused.is_some_and(|status| status.code() == tonic::Code::Unimplemented)
}

/// Every Chukei service, for the checks that a port speaks of no other.
const ALL_SERVICES: [&str; 7] = [
    "chukei.relay.v1.EnterpriseApi",
    "chukei.relay.v1.CarrierIngress",
    "chukei.relay.v1.Admin",
    "chukei.carrier.v1.Carrier",
    "chukei.carrier.v1.SubscriberApi",
    "chukei.carrier.v1.CarrierAdmin",
    "chukei.terminal.v1.Terminal",
];

/// Reflection (v1 and v1alpha) lists exactly the services `url` serves,
/// besides health and reflection; health says SERVING for each of them and
/// NOT_FOUND for every other Chukei service; and the port answers exactly
/// those (every other one is UNIMPLEMENTED there).
async fn port_speaks_of_exactly(url: &str, services: &[&str]) {
    let mut expected: Vec<&str> = services.to_vec();
    expected.extend([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    expected.sort_unstable();
    let (mut v1, mut v1alpha) = listed(url).await;
    v1.sort_unstable();
    v1alpha.sort_unstable();
    assert_eq!(v1, expected, "{url} over v1");
    assert_eq!(v1alpha, expected, "{url} over v1alpha");
    let serving = chukei_proto::health::ServingStatus::Serving as i32;
    assert_eq!(health_of(url, "").await, Some(serving), "{url} as a whole");
    for service in ALL_SERVICES {
        let expected = services.contains(&service).then_some(serving);
        assert_eq!(health_of(url, service).await, expected, "{url}: {service}");
        assert_eq!(
            answers(url, service).await,
            services.contains(&service),
            "{url} answers {service}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_and_health_speak_of_exactly_the_services_served() {
    let mut hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    port_speaks_of_exactly(
        &hub.relay_url(),
        &[
            "chukei.relay.v1.EnterpriseApi",
            "chukei.relay.v1.CarrierIngress",
            "chukei.relay.v1.Admin",
        ],
    )
    .await;
    port_speaks_of_exactly(
        &hub.carriers[0].url(),
        &[
            "chukei.carrier.v1.Carrier",
            "chukei.carrier.v1.SubscriberApi",
            "chukei.carrier.v1.CarrierAdmin",
        ],
    )
    .await;
    let fleet = terminal_sim::fleet::Fleet::generate(3, 1, &["alpha".into()]);
    hub.start_fleet(fleet, vec![], terminal_sim::terminal::OpenMode::Never)
        .await
        .unwrap();
    port_speaks_of_exactly(&hub.fleet_url().unwrap(), &["chukei.terminal.v1.Terminal"]).await;
    hub.shutdown().await.unwrap();
}

/// The Python interpreter with grpcio-reflection, when the run asks for it.
const PYTHON_ENV: &str = "CHUKEI_TEST_PYTHON";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reference_python_client_lists_services_over_v1alpha() {
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!("{PYTHON_ENV} is not set: the Python reflection client check skipped");
        return;
    };
    let hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/list_services.py");
    for (address, service) in [
        (hub.relay_addr.to_string(), "chukei.relay.v1.EnterpriseApi"),
        (
            hub.carriers[0].addr.to_string(),
            "chukei.carrier.v1.Carrier",
        ),
    ] {
        let output = tokio::process::Command::new(&python)
            .arg(script)
            .arg(&address)
            .output()
            .await
            .unwrap_or_else(|error| panic!("{PYTHON_ENV}={python} does not run: {error}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the Python client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let listed: Vec<&str> = stdout.lines().collect();
        assert!(listed.contains(&service), "{address}: {listed:?}");
        assert!(
            listed.contains(&"grpc.health.v1.Health"),
            "{address}: {listed:?}"
        );
    }
    hub.shutdown().await.unwrap();
}

/// The commands whose `--help` makes up the operations guide's reference.
const HELP: &[&[&str]] = &[
    &["relay-svc"],
    &["carrier-svc"],
    &["terminal-sim"],
    &["terminal-sim", "fleet"],
    &["terminal-sim", "interactive"],
    &["enterprise-cli"],
    &["enterprise-cli", "send"],
    &["enterprise-cli", "status"],
    &["enterprise-cli", "explain"],
    &["enterprise-cli", "registrations"],
    &["chukei-admin"],
    &["chukei-admin", "create-enterprise"],
    &["chukei-admin", "create-service"],
    &["chukei-admin", "register-carrier"],
    &["chukei-admin", "rate-card"],
];

/// The configuration reference as the binaries describe themselves (with an
/// empty environment, so no local setting leaks into the text).
fn reference() -> String {
    let mut text = String::new();
    for command in HELP {
        let output = std::process::Command::new(test_binary(command[0]).unwrap())
            .args(&command[1..])
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        assert!(output.status.success(), "{command:?} --help failed");
        text.push_str(&format!(
            "\n### `{}`\n\n```text\n{}```\n",
            command.join(" "),
            String::from_utf8(output.stdout).unwrap()
        ));
    }
    text
}

#[test]
fn the_operations_guide_lists_every_flag_the_binaries_take() {
    const START: &str = "<!-- generated: start -->\n";
    const END: &str = "<!-- generated: end -->";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let guide = std::fs::read_to_string(path).unwrap();
    let (head, rest) = guide.split_once(START).expect("start marker");
    let (current, tail) = rest.split_once(END).expect("end marker");
    let expected = reference();
    if current != expected {
        if std::env::var_os("CHUKEI_UPDATE_DOCS").is_some() {
            std::fs::write(path, format!("{head}{START}{expected}{END}{tail}")).unwrap();
            return;
        }
        panic!(
            "docs/operations.md's configuration reference is out of date; regenerate it with \
             CHUKEI_UPDATE_DOCS=1 cargo test -p integration-tests --test operations"
        );
    }
}

/// `promtool`, when the run asks for the metrics lint (CI installs it).
const PROMTOOL_ENV: &str = "CHUKEI_TEST_PROMTOOL";

/// `GET /metrics` from `addr`: the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the series `series` (name and labels, exactly as exposed).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The `chukei_…` series names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("chukei_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(&tail[..end]);
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_the_work_and_pass_promtool() {
    use chukei_proto::relay::v1 as pb;
    use integration_tests::Settings;
    use integration_tests::scene::{Setup, everyone, scene};

    let scene = scene(
        Backend::Sqlite,
        Setup {
            settings: Settings {
                metrics: true,
                ..Settings::default()
            },
            ..Setup::default()
        },
    )
    .await
    .unwrap();
    let n = scene.fleet.users.len() as u64;
    let id = scene
        .send(
            0,
            pb::SendMessageRequest {
                channel: chukei_proto::common::v1::Channel::Sms as i32,
                ..everyone("metrics", "hello")
            },
        )
        .await;
    scene.wait(0, &id, |s| s.delivered == n).await;
    let refused = scene
        .client(0)
        .send_message(pb::SendMessageRequest::default())
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);

    let relay = scrape(scene.hub.relay_metrics.unwrap()).await;
    let n = n as f64;
    assert_eq!(
        value(
            &relay,
            r#"chukei_relay_messages_accepted_total{target="all"}"#
        ),
        Some(1.0),
        "{relay}"
    );
    assert_eq!(
        value(&relay, "chukei_relay_recipients_expanded_total"),
        Some(n)
    );
    assert_eq!(
        value(
            &relay,
            r#"chukei_relay_deliveries_handed_over_total{carrier="alpha"}"#
        ),
        Some(n)
    );
    assert!(
        value(
            &relay,
            r#"chukei_relay_receipts_total{carrier="alpha",kind="delivered"}"#
        )
        .is_some_and(|v| v >= n),
        "{relay}"
    );
    assert!(
        relay.contains(r#"chukei_relay_deliveries_pending{carrier="alpha"}"#),
        "{relay}"
    );
    assert!(relay.contains(r#"chukei_relay_db_pool_connections{state="idle"}"#));
    // Nothing waits once everyone is delivered: the drain estimate is zero.
    assert_eq!(
        value(
            &relay,
            r#"chukei_relay_deliveries_drain_seconds{carrier="alpha"}"#
        ),
        Some(0.0),
        "{relay}"
    );
    let send = r#"chukei_relay_rpc_duration_seconds_count{method="/chukei.relay.v1.EnterpriseApi/SendMessage",code="0"}"#;
    assert_eq!(value(&relay, send), Some(1.0), "{relay}");
    let invalid = r#"chukei_relay_rpc_duration_seconds_count{method="/chukei.relay.v1.EnterpriseApi/SendMessage",code="3"}"#;
    assert_eq!(value(&relay, invalid), Some(1.0), "{relay}");

    let carrier = scrape(scene.hub.carriers[0].metrics.unwrap()).await;
    assert_eq!(
        value(&carrier, "chukei_carrier_deliveries_accepted_total"),
        Some(n)
    );
    assert_eq!(
        value(
            &carrier,
            r#"chukei_carrier_messages_pushed_total{channel="sms"}"#
        ),
        Some(n),
        "{carrier}"
    );

    let terminals = scrape(scene.hub.fleet_metrics.unwrap()).await;
    assert!(
        terminals.contains("chukei_terminal_rpc_duration_seconds_count{"),
        "{terminals}"
    );

    // The Grafana dashboard shows only series the services export.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/dashboards/chukei.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exported = format!("{relay}{carrier}{terminals}");
    let mut shown = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                let family = name
                    .strip_suffix("_bucket")
                    .or_else(|| name.strip_suffix("_count"))
                    .unwrap_or(name);
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "the dashboard's panel {:?} reads {name}, which no service exports",
                    panel["title"]
                );
                shown += 1;
            }
        }
    }
    assert!(shown >= 15, "{shown}");

    let Ok(promtool) = std::env::var(PROMTOOL_ENV) else {
        eprintln!("{PROMTOOL_ENV} is not set: the promtool lint skipped");
        return;
    };
    for (name, body) in [
        ("relay", relay),
        ("carrier", carrier),
        ("terminals", terminals),
    ] {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .await
            .unwrap();
        let output = child.wait_with_output().await.unwrap();
        assert!(
            output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
            "promtool check metrics on the {name}'s scrape: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The container health check: SERVING exits 0 (NOT_SERVING would be 1); a
/// service the server does not host, or nothing listening, 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_health_check_binary_asks_grpc_health() {
    let hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let health = test_binary("chukei-health").unwrap();
    let run = |args: Vec<String>| {
        let health = health.clone();
        async move {
            tokio::process::Command::new(health)
                .args(args)
                .output()
                .await
                .unwrap()
                .status
                .code()
        }
    };
    let relay = hub.relay_url();
    assert_eq!(run(vec![relay.clone()]).await, Some(0));
    assert_eq!(
        run(vec![relay.clone(), "chukei.relay.v1.EnterpriseApi".into()]).await,
        Some(0)
    );
    assert_eq!(
        run(vec![relay, "chukei.carrier.v1.Carrier".into()]).await,
        Some(2),
        "an unknown service is NOT_FOUND: the check cannot say it serves"
    );
    let closed = format!(
        "http://127.0.0.1:{}",
        integration_tests::process::free_port().unwrap()
    );
    assert_eq!(run(vec![closed]).await, Some(2));
    // --help and --version are answered, not taken as a URL; a URL without
    // its scheme is refused naming the argument.
    for flag in ["--help", "--version"] {
        let output = tokio::process::Command::new(&health)
            .arg(flag)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{flag}: {stdout}");
        assert!(stdout.contains("chukei-health"), "{flag}: {stdout}");
    }
    let output = tokio::process::Command::new(&health)
        .arg("127.0.0.1:50051")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("<URL>") && stderr.contains("http://"),
        "{stderr}"
    );
}

/// The operator's command line bootstraps a hub the way the deployments do:
/// chosen ids, safe to run again with `--exists-ok`, errors naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_cli_bootstraps_a_hub_and_can_run_again() {
    let hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let admin = test_binary("chukei-admin").unwrap();
    let relay = hub.relay_url();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(&admin)
            .args(args)
            .env_clear()
            .env("CHUKEI_RELAY_URL", &relay)
            .env("CHUKEI_ADMIN_TOKEN", integration_tests::ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };

    let (code, out, _) = run(&[
        "create-enterprise",
        "--name",
        "Sakura Mart",
        "--id",
        "sakura",
        "--json",
    ]);
    assert_eq!(code, Some(0));
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["enterprise_id"], "sakura");
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    assert!(api_key.len() >= 32, "{api_key}");

    let (code, out, _) = run(&[
        "create-enterprise",
        "--name",
        "Sakura Mart",
        "--id",
        "sakura",
        "--exists-ok",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "enterprise_id\tsakura\t(already existed)\n")
    );
    let (code, _, err) = run(&[
        "create-enterprise",
        "--name",
        "Sakura Mart",
        "--id",
        "sakura",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("AlreadyExists") && err.contains("enterprise_id"),
        "{err}"
    );
    let (code, _, err) = run(&["create-enterprise", "--name", "x", "--id", "Not A Slug"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("enterprise_id: must be lowercase"), "{err}");

    let service = [
        "create-service",
        "--enterprise",
        "sakura",
        "--name",
        "loyalty",
        "--id",
        "loyalty",
    ];
    assert_eq!(run(&service).0, Some(0));
    let (code, _, err) = run(&service);
    assert!(code == Some(1) && err.contains("service_id"), "{err}");
    let mut again = service.to_vec();
    again.push("--exists-ok");
    assert_eq!(run(&again).0, Some(0));
    let (code, _, err) = run(&[
        "create-service",
        "--enterprise",
        "sakura",
        "--name",
        "loyalty",
        "--id",
        "other",
    ]);
    assert!(code == Some(1) && err.contains("name:"), "{err}");

    let carrier = &hub.carriers[0];
    let endpoint = carrier.url();
    let (code, out, err) = run(&[
        "register-carrier",
        "--id",
        "alpha",
        "--endpoint",
        &endpoint,
        "--token",
        &carrier.token,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "carrier alpha registered\n");
    let (code, _, err) = run(&[
        "register-carrier",
        "--id",
        "alpha",
        "--endpoint",
        "ftp://x",
        "--token",
        &carrier.token,
    ]);
    assert!(
        code == Some(1) && err.contains("endpoint: must be an http(s) URL"),
        "{err}"
    );

    let (code, _, err) = run(&["rate-card", "--entry", "sms:0-0:3:2"]);
    assert!(code == Some(1) && err.contains("InvalidArgument"), "{err}");
    let (code, _, err) = run(&["rate-card", "--entry", "sms:0-0:3"]);
    assert!(code == Some(1) && err.contains("--entry:"), "{err}");
    let (code, out, err) = run(&[
        "rate-card",
        "--zone",
        "Asia/Tokyo",
        "--dynamic",
        "50:200:100",
        "--entry",
        "sms:8-18:3:2",
        "--entry",
        "sms:18-8:4:2",
        "--entry",
        "rcs:0-0:2:3",
        "--entry",
        "sns:0-0:1:1",
        "--entry",
        "email:0-0:1:1",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "price table version 1 in force (Asia/Tokyo, 96 cells)\n"
    );

    // The enterprise's key works, and the carriers table answers.
    let mut enterprise = hub.enterprise(&api_key).await.unwrap();
    let prices = enterprise
        .get_prices(chukei_proto::relay::v1::GetPricesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prices.version, 1);
    let (code, out, _) = run(&["carriers"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|line| line.starts_with("alpha ")),
        "{out}"
    );

    let (code, _, err) = run(&["--admin-token", "wrong-token-0000000000", "carriers"]);
    assert!(code == Some(1) && err.contains("Unauthenticated"), "{err}");
    hub.shutdown().await.unwrap();
}

/// With `--subscriber-listen`, the carrier's `--listen` port serves only the
/// relay's Deliver stream (what a network policy admits only the relay to), and
/// the subscriber-facing services answer on their own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_carrier_can_serve_its_subscribers_on_a_separate_port() {
    use chukei_proto::auth::BearerInterceptor;
    use chukei_proto::carrier::v1 as cpb;
    use clap::Parser;

    let dir = tempfile::tempdir().unwrap();
    let deliver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deliver_url = format!("http://{}", deliver.local_addr().unwrap());
    let subscriber_port = integration_tests::process::free_port().unwrap();
    let subscriber_url = format!("http://127.0.0.1:{subscriber_port}");
    let config = carrier_svc::Config::try_parse_from([
        "carrier-svc",
        "--carrier-id",
        "alpha",
        "--token",
        "carrier-token-0123456789",
        "--relay-token",
        "relay-token-0123456789",
        "--admin-token",
        "carrier-admin-0123456789",
        "--subscriber-listen",
        &format!("127.0.0.1:{subscriber_port}"),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let carrier = tokio::spawn(carrier_svc::run(config, deliver, async move {
        let _ = stopped.await;
    }));
    integration_tests::wait_healthy(&deliver_url).await.unwrap();
    integration_tests::wait_healthy(&subscriber_url)
        .await
        .unwrap();
    port_speaks_of_exactly(&deliver_url, &["chukei.carrier.v1.Carrier"]).await;
    port_speaks_of_exactly(
        &subscriber_url,
        &[
            "chukei.carrier.v1.SubscriberApi",
            "chukei.carrier.v1.CarrierAdmin",
        ],
    )
    .await;

    let admin = |url: String| async move {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        cpb::carrier_admin_client::CarrierAdminClient::with_interceptor(
            channel,
            BearerInterceptor::new("carrier-admin-0123456789").unwrap(),
        )
    };
    let counts = admin(subscriber_url.clone())
        .await
        .get_counts(cpb::GetCountsRequest::default())
        .await;
    assert!(counts.is_ok(), "{counts:?}");
    let refused = admin(deliver_url.clone())
        .await
        .get_counts(cpb::GetCountsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    let mut subscribers = cpb::subscriber_api_client::SubscriberApiClient::connect(deliver_url)
        .await
        .unwrap();
    let refused = subscribers
        .attach(cpb::AttachRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    let mut deliver_elsewhere = cpb::carrier_client::CarrierClient::connect(subscriber_url)
        .await
        .unwrap();
    let refused = deliver_elsewhere
        .deliver(tokio_stream::iter(Vec::<cpb::RelayToCarrier>::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    stop.send(()).unwrap();
    carrier.await.unwrap().unwrap();
}

/// A configuration a service refuses is one line naming the flag and exit
/// code 2 — no backtrace, even with `RUST_BACKTRACE` set — before any port
/// is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_configuration_is_one_line_naming_the_flag() {
    for (binary, args, flag) in [
        (
            "relay-svc",
            &[
                "--admin-token",
                "short",
                "--deliver-token",
                "deliver-token-0123456789",
            ][..],
            "--admin-token",
        ),
        (
            "carrier-svc",
            &[
                "--carrier-id",
                "alpha",
                "--token",
                "carrier-token-0123456789",
                "--relay-token",
                "short",
                "--admin-token",
                "carrier-admin-0123456789",
            ][..],
            "--relay-token",
        ),
    ] {
        let output = tokio::process::Command::new(test_binary(binary).unwrap())
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{binary}: one line, no backtrace: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(flag),
            "{binary}: {stderr}"
        );
    }
}

/// Every binary the image and the repository ship.
const BINARIES: &[&str] = &[
    "relay-svc",
    "carrier-svc",
    "terminal-sim",
    "enterprise-cli",
    "chukei-admin",
    "chukei-health",
    "chukei-conformance",
    "chukei-local",
    "bench",
    "chaos",
    "evaluate",
];

#[test]
fn every_binary_answers_help_and_version_and_refuses_a_bad_flag_in_one_line() {
    for name in BINARIES {
        let run = |args: &[&str]| {
            std::process::Command::new(test_binary(name).unwrap())
                .args(args)
                .env_clear()
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        for flag in ["--help", "--version"] {
            let output = run(&[flag]);
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert_eq!(output.status.code(), Some(0), "{name} {flag}: {stdout}");
            assert!(stdout.contains(name), "{name} {flag}: {stdout}");
        }
        let output = run(&["--no-such-flag"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains("'--no-such-flag'"), "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name} printed before parsing");
    }
    // A bad value names its flag.
    let output = std::process::Command::new(test_binary("relay-svc").unwrap())
        .args(["--listen", "not-an-address"])
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");
}
