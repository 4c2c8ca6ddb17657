//! The deployment manifests, validated without a container engine: the
//! compose file by `docker-compose config` and the Compose JSON schema, every
//! rendered kustomize overlay by `kubernetes-validate --strict`, all YAML by
//! `yamllint`, the Prometheus configuration by `promtool`; and every flag and
//! environment variable the manifests hand a Chukei binary is one that binary
//! takes (from its `--help`).
//!
//! The tools come from Debian and PyPI (`.ci/run` installs them). They are
//! required when `CHUKEI_TEST_DEPLOY_TOOLS` is set — a missing tool then fails
//! the test — and the tests are skipped, with a note, when it is not.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::process::test_binary;
use serde_json::Value;

const TOOLS_ENV: &str = "CHUKEI_TEST_DEPLOY_TOOLS";

/// Kubernetes versions the overlays must validate against.
const KUBERNETES_VERSIONS: &[&str] = &["1.33.0", "1.37.0"];

const OVERLAYS: &[&str] = &["dev", "prod"];

fn tools_wanted(test: &str) -> bool {
    let wanted = std::env::var_os(TOOLS_ENV).is_some();
    if !wanted {
        eprintln!("{TOOLS_ENV} is not set: {test} skipped");
    }
    wanted
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs a tool; its stdout when it succeeds, else a panic with its output.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(deploy_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{program}: cannot run ({error}); is it installed?"));
    let input = stdin.unwrap_or_default().to_owned();
    let mut pipe = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn kustomize(overlay: &str) -> String {
    run(
        "kubectl",
        &["kustomize", &format!("k8s/overlays/{overlay}")],
        None,
    )
}

/// All YAML documents of `yaml` as JSON values (PyYAML, which yamllint brings).
fn documents(yaml: &str) -> Vec<Value> {
    let json = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ],
        Some(yaml),
    );
    serde_json::from_str(&json).unwrap()
}

#[test]
fn the_manifests_pass_the_validators() {
    if !tools_wanted("the manifest validation") {
        return;
    }
    for files in COMPOSE_FILES {
        run("docker-compose", &[files, &["config", "-q"]].concat(), None);
    }
    run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            "compose.yaml",
            "compose.gateways.yaml",
        ],
        None,
    );
    run("yamllint", &["--strict", "-c", ".yamllint.yaml", "."], None);
    run(
        "promtool",
        &["check", "config", "prometheus/prometheus.yml"],
        None,
    );
    for overlay in OVERLAYS {
        let rendered = kustomize(overlay);
        for version in KUBERNETES_VERSIONS {
            run(
                "kubernetes-validate",
                &["--strict", "--quiet", "-k", version, "-"],
                Some(&rendered),
            );
        }
    }
}

/// The validators do catch mistakes: a field Kubernetes does not know fails.
#[test]
fn the_kubernetes_validation_refuses_an_unknown_field() {
    if !tools_wanted("the validator check") {
        return;
    }
    let rendered = kustomize("dev").replacen(
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: true\n          readOnlyRootFilesytem: true",
        1,
    );
    let refused = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSIONS[0], "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(rendered.as_bytes())?;
            child.wait()
        })
        .unwrap();
    assert!(!refused.success());
}

/// Variables every binary reads outside its flags (logging and OTLP export).
const COMMON_ENV: &[&str] = &[
    "RUST_LOG",
    "CHUKEI_LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// What a command line takes: its flags and environment variables, from `--help`.
#[derive(Default)]
struct Accepted {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn accepted(command: &[&str]) -> Accepted {
    let output = Command::new(test_binary(command[0]).unwrap())
        .args(&command[1..])
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success(), "{command:?} --help failed");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut accepted = Accepted::default();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(flag) = word.strip_prefix("--")
            && let Some(flag) = flag.split(['=', '<']).next()
            && !flag.is_empty()
        {
            accepted.flags.insert(flag.to_owned());
        }
    }
    for (at, _) in help.match_indices("[env: ") {
        let name: String = help[at + 6..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        accepted.env.insert(name);
    }
    accepted
}

/// One container's command line and environment, as a manifest sets them.
struct Launch {
    place: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
}

/// The compose set-ups: the hub, and the hub with the gateways overlay.
const COMPOSE_FILES: [&[&str]; 2] = [
    &["-f", "compose.yaml"],
    &["-f", "compose.yaml", "-f", "compose.gateways.yaml"],
];

fn compose_launches() -> Vec<Launch> {
    let mut launches = Vec::new();
    for files in COMPOSE_FILES {
        launches.extend(compose_launches_of(files));
    }
    launches
}

fn compose_launches_of(files: &[&str]) -> Vec<Launch> {
    let config = run("docker-compose", &[files, &["config"]].concat(), None);
    let config = documents(&config).remove(0);
    let mut launches = Vec::new();
    for (name, service) in config["services"].as_object().unwrap() {
        if !service["image"]
            .as_str()
            .unwrap_or("")
            .starts_with("chukei")
        {
            continue;
        }
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        let env = service["environment"]
            .as_object()
            .map(|env| {
                env.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        launches.push(Launch {
            place: format!("compose service {name}"),
            command: strings(&service["command"]),
            env,
        });
        if let Some(test) = service["healthcheck"]["test"].as_array() {
            launches.push(Launch {
                place: format!("compose service {name}'s health check"),
                command: test[1..]
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect(),
                env: Vec::new(),
            });
        }
    }
    launches
}

fn kubernetes_launches(overlay: &str) -> Vec<Launch> {
    let objects = documents(&kustomize(overlay));
    let config_maps: HashMap<&str, &serde_json::Map<String, Value>> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap(),
                o["data"].as_object().unwrap(),
            )
        })
        .collect();
    let mut launches = Vec::new();
    for object in &objects {
        let spec = match object["kind"].as_str().unwrap() {
            "Deployment" | "Job" | "StatefulSet" => &object["spec"]["template"]["spec"],
            _ => continue,
        };
        for container in spec["containers"].as_array().unwrap() {
            let image = container["image"].as_str().unwrap();
            if !image.contains("chukei") {
                continue;
            }
            let mut command: Vec<String> = Vec::new();
            for part in ["command", "args"] {
                for arg in container[part].as_array().into_iter().flatten() {
                    command.push(arg.as_str().unwrap().to_owned());
                }
            }
            let mut env = Vec::new();
            for var in container["env"].as_array().into_iter().flatten() {
                let value = var["value"].as_str().unwrap_or_default().to_owned();
                env.push((var["name"].as_str().unwrap().to_owned(), value));
            }
            for source in container["envFrom"].as_array().into_iter().flatten() {
                let name = source["configMapRef"]["name"].as_str().unwrap();
                let data = config_maps
                    .get(name)
                    .unwrap_or_else(|| panic!("{overlay}: no ConfigMap {name}"));
                for (key, value) in data.iter() {
                    env.push((key.clone(), value.as_str().unwrap().to_owned()));
                }
            }
            launches.push(Launch {
                place: format!(
                    "{overlay} {} {} container {}",
                    object["kind"].as_str().unwrap(),
                    object["metadata"]["name"].as_str().unwrap(),
                    container["name"].as_str().unwrap()
                ),
                command,
                env,
            });
        }
    }
    launches
}

/// The `chukei-admin` calls in the bootstrap script: subcommand and flags.
fn bootstrap_calls() -> Vec<(String, Vec<String>)> {
    let script = std::fs::read_to_string(deploy_dir().join("bootstrap.sh")).unwrap();
    let joined = script.replace("\\\n", " ");
    let mut calls = Vec::new();
    for line in joined.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let Some((_, call)) = line.split_once("chukei-admin ") else {
            continue;
        };
        let mut words = call.split_whitespace();
        let subcommand = words.next().unwrap().to_owned();
        let flags = words
            .filter_map(|w| w.strip_prefix("--"))
            .map(|f| f.split('=').next().unwrap().to_owned())
            .collect();
        calls.push((subcommand, flags));
    }
    calls
}

#[test]
fn the_manifests_pass_only_flags_and_variables_the_binaries_take() {
    if !tools_wanted("the flag and variable check") {
        return;
    }
    let mut launches = compose_launches();
    for overlay in OVERLAYS {
        launches.extend(kubernetes_launches(overlay));
    }
    let admin = accepted(&["chukei-admin"]);
    let mut checked = 0;
    for launch in &launches {
        let Launch {
            place,
            command,
            env,
        } = launch;
        let program = command
            .first()
            .unwrap_or_else(|| panic!("{place}: no command"));
        let (accepted, flags): (Accepted, &[String]) = match program.as_str() {
            "chukei-health" => {
                // Takes a URL and a service name, no flags.
                test_binary(program).unwrap();
                assert!(
                    command[1..].iter().all(|a| !a.starts_with('-')) && env.is_empty(),
                    "{place}: {command:?}"
                );
                continue;
            }
            "relay-svc" | "carrier-svc" => (accepted(&[program.as_str()]), &command[1..]),
            "terminal-sim" => {
                let subcommand = command.get(1).map(String::as_str).unwrap_or("fleet");
                (accepted(&["terminal-sim", subcommand]), &command[2..])
            }
            "chukei-bootstrap" => {
                // The script's own variables, and what chukei-admin reads.
                let script = std::fs::read_to_string(deploy_dir().join("bootstrap.sh")).unwrap();
                let carriers: Vec<String> = env
                    .iter()
                    .find(|(k, _)| k == "CHUKEI_BOOTSTRAP_CARRIERS")
                    .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_else(|| panic!("{place}: CHUKEI_BOOTSTRAP_CARRIERS unset"));
                for (name, _) in env {
                    if let Some(id) = name.strip_prefix("CHUKEI_BOOTSTRAP_TOKEN_") {
                        let id = id.to_lowercase().replace('_', "-");
                        assert!(carriers.contains(&id), "{place}: {name} for no carrier");
                    } else {
                        assert!(
                            admin.env.contains(name) || script.contains(&format!("#   {name}")),
                            "{place}: the bootstrap reads no {name}"
                        );
                    }
                    checked += 1;
                }
                for carrier in &carriers {
                    let token = format!(
                        "CHUKEI_BOOTSTRAP_TOKEN_{}",
                        carrier.to_uppercase().replace('-', "_")
                    );
                    assert!(
                        env.iter().any(|(k, _)| *k == token),
                        "{place}: {token} unset"
                    );
                }
                continue;
            }
            other => panic!("{place}: {other} is not a Chukei binary"),
        };
        for flag in flags {
            if let Some(name) = flag.strip_prefix("--") {
                let name = name.split('=').next().unwrap();
                assert!(
                    accepted.flags.contains(name),
                    "{place}: {program} takes no --{name}"
                );
                checked += 1;
            }
        }
        for (name, _) in env {
            assert!(
                accepted.env.contains(name) || COMMON_ENV.contains(&name.as_str()),
                "{place}: {program} reads no {name}"
            );
            checked += 1;
        }
    }
    for (subcommand, flags) in bootstrap_calls() {
        let takes = accepted(&["chukei-admin", &subcommand]);
        for flag in flags {
            assert!(
                takes.flags.contains(&flag),
                "bootstrap.sh: chukei-admin {subcommand} takes no --{flag}"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} settings checked");
}

/// The bootstrap the compose file and the Kubernetes Job run sets a hub up
/// through `chukei-admin`, and running it again changes nothing it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bootstrap_script_sets_up_a_hub_and_can_run_again() {
    use chukei_proto::relay::v1 as pb;
    use integration_tests::{Backend, Hub};

    let hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let carrier = &hub.carriers[0];
    let bin_dir = test_binary("chukei-admin")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let bootstrap = || {
        let output = Command::new("sh")
            .arg(deploy_dir().join("bootstrap.sh"))
            .env_clear()
            .env("PATH", &path)
            .env("CHUKEI_RELAY_URL", hub.relay_url())
            .env("CHUKEI_ADMIN_TOKEN", integration_tests::ADMIN_TOKEN)
            .env("CHUKEI_BOOTSTRAP_CARRIERS", "alpha")
            .env("CHUKEI_BOOTSTRAP_TOKEN_ALPHA", &carrier.token)
            .env("CHUKEI_BOOTSTRAP_CARRIER_URL", carrier.url())
            .env(
                "CHUKEI_BOOTSTRAP_ENTERPRISES",
                "sakura=loyalty,pharmacy fuji-rail",
            )
            .env(
                "CHUKEI_BOOTSTRAP_RATE_CARD",
                "sms:0-0:3:2 rcs:0-0:2:3 sns:0-0:1:1 email:0-0:1:1",
            )
            .env("CHUKEI_BOOTSTRAP_ZONE", "Asia/Tokyo")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let first = bootstrap();
    assert!(first.contains("carrier alpha registered"), "{first}");
    assert!(
        first.contains("enterprise_id\tsakura\napi_key\t"),
        "{first}"
    );
    assert!(first.contains("service_id\tsakura-pharmacy"), "{first}");
    assert!(first.ends_with("bootstrap done\n"), "{first}");
    let api_key = first
        .lines()
        .find_map(|line| line.strip_prefix("api_key\t"))
        .unwrap()
        .to_owned();

    let again = bootstrap();
    assert!(!again.contains("api_key"), "{again}");
    assert!(
        again.contains("enterprise_id\tsakura\t(already existed)"),
        "{again}"
    );
    assert!(
        again.contains("service_id\tsakura-loyalty\t(already existed)"),
        "{again}"
    );

    // The enterprise works with its key: the services exist, prices are set.
    let mut enterprise = hub.enterprise(&api_key).await.unwrap();
    let prices = enterprise
        .get_prices(pb::GetPricesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (prices.zone.as_str(), prices.cells.len()),
        ("Asia/Tokyo", 96)
    );
    let duplicate = hub
        .admin()
        .await
        .unwrap()
        .create_service(pb::CreateServiceRequest {
            enterprise_id: "sakura".into(),
            name: "loyalty".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), tonic::Code::AlreadyExists);
    hub.shutdown().await.unwrap();
}
