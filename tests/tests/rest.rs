//! The REST/JSON edge, on the relay's one port beside gRPC, on both
//! backends: a send answered 201 and replayed 200 by its `Idempotency-Key`,
//! the same key for another body refused, bad input refused as a problem
//! naming the field, a message followed to its opens, statistics as JSON and
//! CSV, registrations a page at a time, another tenant's message "not
//! found", 429 with `Retry-After`; and the checked-in OpenAPI document is
//! the one the code generates.

use std::collections::HashSet;
use std::time::Duration;

use integration_tests::http::{Reply, call};
use integration_tests::{Backend, Hub, backend_tests, eventually, refs_by_user};
use serde_json::{Value, json};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

/// A hub with one enterprise, "shop", whose calls are limited to `per_sec`
/// a second (0: unlimited); its API key.
async fn shop_limited_to(backend: Backend, per_sec: u32) -> Option<(Hub, String)> {
    let settings = integration_tests::Settings {
        enterprise_rate_per_sec: per_sec,
        ..Default::default()
    };
    let hub = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()?;
    let (_, key) = hub.create_enterprise("shop").await.unwrap();
    Some((hub, key))
}

fn assert_problem(reply: &Reply, status: u16, field: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "{}",
        reply.body
    );
    let problem = reply.json();
    assert_eq!(problem["status"], status);
    assert_eq!(problem["field"].as_str(), field, "{problem}");
    assert!(!problem["detail"].as_str().unwrap().is_empty());
}

async fn the_rest_api_sends_follows_and_refuses_by_field(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let (_, other_key) = hub.create_enterprise("other").await.unwrap();
    let fleet = Fleet::generate(31, 40, &["alpha".into()]).with_every_channel();
    let _terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice::enterprise(&shop)],
            OpenMode::Always,
        )
        .await
        .unwrap();
    let refs: Vec<String> = refs_by_user(&hub, &fleet, &shop)
        .await
        .into_values()
        .collect();
    assert!(refs.len() >= 3, "{} refs", refs.len());
    let relay = hub.relay_url();
    let bearer = format!("Bearer {key}");
    let auth = [("Authorization", bearer.as_str())];

    // A send: 201, a Location, planned at once (refs).
    let body = json!({
        "target": {"refs": [refs[0], refs[1]]},
        "content": {"text": "your parcel arrives today"},
        "channel": "sms",
        "priority": "high",
    });
    let with_key = [
        ("Authorization", bearer.as_str()),
        ("Idempotency-Key", "parcel-1"),
    ];
    let sent = call(&relay, "POST", "/v1/messages", &with_key, Some(&body)).await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    let accepted = sent.json();
    let message_id = accepted["message_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["state"], "expanded");
    assert_eq!(accepted["matched"], 2);
    assert_eq!(accepted["replayed"], false);
    assert!(accepted["accepted_at"].as_str().unwrap().ends_with('Z'));
    let location = format!("/v1/messages/{message_id}");
    assert_eq!(sent.header("location"), Some(location.as_str()));

    // The same key and body: the same message, marked a replay.
    let again = call(&relay, "POST", "/v1/messages", &with_key, Some(&body)).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json()["message_id"], message_id.as_str());
    assert_eq!(again.json()["replayed"], true);
    // The same key for another message: refused, naming the key.
    let other_body = json!({"target": {"refs": [refs[2]]}, "content": {"text": "another"}});
    let clash = call(&relay, "POST", "/v1/messages", &with_key, Some(&other_body)).await;
    assert_problem(&clash, 409, Some("idempotency_key"));

    // Bad input, each named, nothing stored.
    let unknown_ref = json!({"target": {"refs": [refs[0], "r-nobody"]}, "content": {"text": "x"}});
    let reply = call(&relay, "POST", "/v1/messages", &auth, Some(&unknown_ref)).await;
    assert_problem(&reply, 404, Some("target.refs[1]"));
    let one_channel_fallback = json!({
        "target": {"all_registered": true}, "content": {"text": "x"},
        "policy": {"kind": "fallback", "channels": ["rcs"], "timeout_seconds": 600},
    });
    let reply = call(
        &relay,
        "POST",
        "/v1/messages",
        &auth,
        Some(&one_channel_fallback),
    )
    .await;
    assert_problem(&reply, 400, Some("policy.channels"));
    let bad_window = json!({
        "target": {"all_registered": true}, "content": {"text": "x"},
        "window": {"daily": {"start": "25:00", "end": "21:00", "time_zone": "Asia/Tokyo"}},
    });
    let reply = call(&relay, "POST", "/v1/messages", &auth, Some(&bad_window)).await;
    assert_problem(&reply, 400, Some("window.daily.start"));
    let no_window =
        json!({"target": {"all_registered": true}, "content": {"text": "x"}, "window": {}});
    let reply = call(&relay, "POST", "/v1/messages", &auth, Some(&no_window)).await;
    assert_problem(&reply, 400, Some("window"));
    let past = json!({"target": {"all_registered": true}, "content": {"text": "x"}, "expires_at": "2001-01-01T00:00:00Z"});
    let reply = call(&relay, "POST", "/v1/messages", &auth, Some(&past)).await;
    assert_problem(&reply, 400, Some("expires_at"));
    let unknown_field =
        json!({"target": {"all_registered": true}, "content": {"text": "x"}, "colour": "red"});
    let reply = call(&relay, "POST", "/v1/messages", &auth, Some(&unknown_field)).await;
    assert!(reply.status == 400 || reply.status == 422, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert!(reply.body.contains("colour"), "{}", reply.body);
    let reply = call(&relay, "POST", "/v1/messages", &[], Some(&body)).await;
    assert_problem(&reply, 401, Some("authorization"));
    let reply = call(&relay, "GET", "/v1/nothing-here", &auth, None).await;
    assert_problem(&reply, 404, None);

    // Followed to its opens (the terminals open everything).
    let status = eventually("both opened", Duration::from_secs(30), || async {
        let reply = call(&relay, "GET", &location, &auth, None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let status = reply.json();
        (status["opened"] == 2).then_some(status)
    })
    .await;
    assert_eq!(status["delivered"], 2);
    assert_eq!(status["handed_over"], 2);
    assert_eq!(status["message_id"], message_id.as_str());
    // Another enterprise does not see it.
    let other_auth = format!("Bearer {other_key}");
    let reply = call(
        &relay,
        "GET",
        &location,
        &[("Authorization", &other_auth)],
        None,
    )
    .await;
    assert_problem(&reply, 404, Some("message_id"));
    // Why one ref got it.
    let path = format!("{location}/recipients/{}", refs[0]);
    let explained = call(&relay, "GET", &path, &auth, None).await;
    assert_eq!(explained.status, 200, "{}", explained.body);
    assert_eq!(explained.json()["attempts"][0]["channel"], "sms");

    // Statistics, as JSON and as CSV.
    let stats = eventually("the opens rolled up", Duration::from_secs(30), || async {
        let reply = call(&relay, "GET", "/v1/stats?by=channel", &auth, None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let stats = reply.json();
        (stats["rows"][0]["opened"] == 2).then_some(stats)
    })
    .await;
    assert_eq!(stats["columns"], json!(["channel"]));
    let csv = call(
        &relay,
        "GET",
        "/v1/stats?by=channel",
        &[auth[0], ("Accept", "text/csv")],
        None,
    )
    .await;
    assert_eq!(csv.status, 200);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    assert!(
        csv.body
            .starts_with("channel,sent,delivered,opened,open_rate"),
        "{}",
        csv.body
    );
    let reply = call(&relay, "GET", "/v1/stats?by=colour", &auth, None).await;
    assert_problem(&reply, 400, Some("by"));

    // Registrations, a page at a time, each ref once.
    let mut seen = HashSet::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(token) => format!("/v1/registrations?page_size=7&page_token={token}"),
            None => "/v1/registrations?page_size=7".to_owned(),
        };
        let page = call(&relay, "GET", &path, &auth, None).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        for registration in page["registrations"].as_array().unwrap() {
            assert!(seen.insert(registration["user_ref"].as_str().unwrap().to_owned()));
        }
        match page["next_page_token"].as_str() {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, refs.iter().cloned().collect::<HashSet<_>>());

    // A quote, and the prices and statement it reads.
    let quote = call(
        &relay,
        "POST",
        "/v1/quotes",
        &auth,
        Some(&json!({
            "target": {"all_registered": true}, "content": {"text": "sale"}, "channel": "sms",
        })),
    )
    .await;
    assert_eq!(quote.status, 200, "{}", quote.body);
    assert_eq!(quote.json()["recipients"], refs.len());
    assert_eq!(
        call(&relay, "GET", "/v1/prices", &auth, None).await.status,
        200
    );
    let statement = call(&relay, "GET", "/v1/statements/2026-11", &auth, None).await;
    assert_eq!(statement.status, 200, "{}", statement.body);
    let reply = call(&relay, "GET", "/v1/statements/november", &auth, None).await;
    assert_problem(&reply, 400, Some("month"));

    // The document the code generates is the one served.
    let served = call(&relay, "GET", "/v1/openapi.json", &[], None).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, relay_svc::rest::openapi());
    hub.shutdown().await.unwrap();
}

async fn a_rate_limited_call_is_429_with_retry_after(backend: Backend) {
    let Some((hub, key)) = shop_limited_to(backend, 1).await else {
        return;
    };
    let relay = hub.relay_url();
    let bearer = format!("Bearer {key}");
    let mut limited = None;
    for _ in 0..10 {
        let reply = call(
            &relay,
            "GET",
            "/v1/prices",
            &[("Authorization", &bearer)],
            None,
        )
        .await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("ten calls at once at 1 a second are limited");
    assert_problem(&limited, 429, None);
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"per-enterprise\";q=1;w=1")
    );
    assert_eq!(
        limited.header("ratelimit"),
        Some(format!("\"per-enterprise\";r=0;t={retry_after}").as_str())
    );
    hub.shutdown().await.unwrap();
}

/// Schemathesis (when `CHUKEI_TEST_SCHEMATHESIS` names its command, as in
/// CI) generates calls from the served document — examples, boundaries,
/// fuzzing and stateful sequences — against a live relay: no 5xx, and every
/// status code, content type, header and body is one the document declares.
async fn schemathesis_finds_no_server_error_and_nothing_off_the_document(backend: Backend) {
    let Some(command) = std::env::var_os("CHUKEI_TEST_SCHEMATHESIS") else {
        eprintln!("CHUKEI_TEST_SCHEMATHESIS unset: the schemathesis run is skipped");
        return;
    };
    let Some((hub, key)) = shop_limited_to(backend, 0).await else {
        return;
    };
    let spec = format!("{}/v1/openapi.json", hub.relay_url());
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(command)
        .current_dir(dir.path())
        .args(["run", &spec, "--max-examples", "25", "--seed", "1", "--checks"])
        .arg("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance")
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    hub.shutdown().await.unwrap();
}

/// A client generated from the checked-in document by openapi-python-client
/// (when `CHUKEI_TEST_OPENAPI_CLIENT` names the generator and
/// `CHUKEI_TEST_PYTHON` a Python, as in CI) sends a message, replays it by
/// its `Idempotency-Key`, and meets a 429 it waits out by `Retry-After`
/// (`tests/python/generated_client.py`).
async fn a_client_generated_from_the_document_sends_replays_and_waits_out_a_429(backend: Backend) {
    let (Some(generator), Some(python)) = (
        std::env::var_os("CHUKEI_TEST_OPENAPI_CLIENT"),
        std::env::var_os("CHUKEI_TEST_PYTHON"),
    ) else {
        eprintln!(
            "CHUKEI_TEST_OPENAPI_CLIENT or CHUKEI_TEST_PYTHON unset: the generated client is not tried"
        );
        return;
    };
    let Some((hub, key)) = shop_limited_to(backend, 1).await else {
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let generated = tokio::process::Command::new(generator)
        .args([
            "generate",
            "--meta",
            "none",
            "--output-path",
            "chukei_client",
            "--path",
        ])
        .arg(root.join("docs/openapi.json"))
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&generated.stdout).into_owned()
        + &String::from_utf8_lossy(&generated.stderr);
    assert!(
        generated.status.success() && !said.contains("Warning"),
        "{said}"
    );
    let run = tokio::process::Command::new(python)
        .arg(root.join("tests/python/generated_client.py"))
        .arg(dir.path())
        .arg(hub.relay_url())
        .arg(&key)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && out.starts_with("ok:"),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    hub.shutdown().await.unwrap();
}

backend_tests!(
    a_client_generated_from_the_document_sends_replays_and_waits_out_a_429,
    the_rest_api_sends_follows_and_refuses_by_field,
    a_rate_limited_call_is_429_with_retry_after,
    schemathesis_finds_no_server_error_and_nothing_off_the_document,
);

/// `docs/openapi.json` is what the code generates (run with
/// `CHUKEI_WRITE_OPENAPI=1` to write it after changing the REST edge).
#[test]
fn the_checked_in_openapi_document_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let generated = relay_svc::rest::openapi();
    if std::env::var_os("CHUKEI_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is not what the code generates: run CHUKEI_WRITE_OPENAPI=1 cargo test -p integration-tests --test rest"
    );
    let document: Value = serde_json::from_str(&generated).unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
}

/// The document is valid OpenAPI 3.1 to an independent validator
/// (`openapi-spec-validator`, when `CHUKEI_TEST_PYTHON` names a Python
/// with it, as CI's does).
#[test]
fn the_openapi_document_passes_an_independent_validator() {
    let Some(python) = std::env::var_os("CHUKEI_TEST_PYTHON") else {
        eprintln!("CHUKEI_TEST_PYTHON unset: the independent OpenAPI validation is skipped");
        return;
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), relay_svc::rest::openapi()).unwrap();
    let output = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))\nprint('valid')",
        ])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "openapi-spec-validator refused the document: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
