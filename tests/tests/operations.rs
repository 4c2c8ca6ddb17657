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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_every_service_over_v1_and_v1alpha() {
    let hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let expectations = [
        (
            hub.relay_url(),
            &[
                "chukei.relay.v1.EnterpriseApi",
                "chukei.relay.v1.CarrierIngress",
                "chukei.relay.v1.Admin",
                "grpc.health.v1.Health",
            ][..],
        ),
        (
            hub.carriers[0].url(),
            &[
                "chukei.carrier.v1.Carrier",
                "chukei.carrier.v1.SubscriberApi",
                "chukei.carrier.v1.CarrierAdmin",
                "grpc.health.v1.Health",
            ][..],
        ),
    ];
    for (url, services) in expectations {
        let (v1, v1alpha) = listed(&url).await;
        for service in services {
            assert!(
                v1.iter().any(|s| s == service),
                "{url} v1 lacks {service}: {v1:?}"
            );
            assert!(
                v1alpha.iter().any(|s| s == service),
                "{url} v1alpha lacks {service}: {v1alpha:?}"
            );
        }
    }
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
