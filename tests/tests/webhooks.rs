//! Status webhooks end to end, on both backends, against receivers that are
//! not ours: a Python HTTP server that verifies every request with the
//! `standardwebhooks` and `svix` libraries (`tests/python/webhook_receiver.py`).
//! During a campaign the first endpoint answers 503 twice, takes longer than
//! the relay's timeout once, crashes and is started again; the second
//! answers 410 and is disabled. After de-duplication by event id the events
//! received are exactly the message's counts, per kind; each message's
//! sequence numbers run 1, 2, 3… without a gap; a person's events come in
//! funnel order; every signature verified. Bad input to the endpoints API
//! is refused naming the field.
//!
//! Needs `CHUKEI_TEST_PYTHON` (a Python with `standardwebhooks` and `svix`,
//! as `.ci/run` installs); without it the test says so and does nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::http::call;
use integration_tests::process::{Process, free_port};
use integration_tests::{Backend, Hub, Settings, backend_tests, eventually, refs_by_user};
use serde_json::{Value, json};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

const PYTHON_ENV: &str = "CHUKEI_TEST_PYTHON";

/// A receiver process on `port`, writing what it verified to `out`.
fn receiver(python: &Path, port: u16, secret: &str, out: &Path, script: &str) -> Process {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/python/webhook_receiver.py");
    Process::spawn(
        "webhook_receiver.py",
        Command::new(python)
            .arg(path)
            .args(["--port", &port.to_string(), "--secret", secret])
            .arg("--out")
            .arg(out)
            .args(["--script", script, "--slow-secs", "2.5"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
    .unwrap()
}

/// Every line the receiver has finished writing (one it is still writing,
/// without its newline yet, is read next time).
fn received(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .map(|line| serde_json::from_str(line.trim_end()).unwrap())
        .collect()
}

/// The events received, each once (by its id), with every copy of it
/// checked to carry the same fields.
fn unique_events(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut events: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        assert!(
            line.get("bad_signature").is_none(),
            "a request failed verification: {line}"
        );
        assert_eq!(line["type"], "events.batch");
        for event in line["events"].as_array().unwrap() {
            let id = event["id"].as_str().unwrap().to_owned();
            if let Some(seen) = events.get(&id) {
                assert_eq!(seen, event, "a retry changed event {id}");
            }
            events.insert(id, event.clone());
        }
    }
    events
}

/// How many different events of `message_id` the receiver got.
fn count_of(out: &Path, message_id: &str) -> u64 {
    unique_events(&received(out))
        .values()
        .filter(|e| e["message_id"] == message_id)
        .count() as u64
}

/// A batch that came more than once came with the same events each time.
fn assert_batches_unchanged(lines: &[Value]) {
    let mut batches: HashMap<&str, &Value> = HashMap::new();
    for line in lines {
        let id = line["webhook_id"].as_str().unwrap();
        if let Some(first) = batches.insert(id, &line["events"]) {
            assert_eq!(
                first, &line["events"],
                "batch {id} changed between attempts"
            );
        }
    }
}

async fn webhooks_reach_receivers_that_fail_crash_and_leave(backend: Backend) {
    let Some(python) = std::env::var_os(PYTHON_ENV).map(PathBuf::from) else {
        eprintln!("{PYTHON_ENV} unset: the webhook receivers are not started");
        return;
    };
    let settings = Settings {
        webhook_retry_schedule: "200ms,400ms,800ms".parse().unwrap(),
        webhook_timeout_secs: 1,
        ..Default::default()
    };
    let Some(mut hub) = Hub::start_settings(backend, &["alpha", "beta"], settings)
        .await
        .unwrap()
    else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(47, 60, &["alpha".into(), "beta".into()]);
    let _terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice::enterprise(&shop)],
            OpenMode::Always,
        )
        .await
        .unwrap();
    let people = refs_by_user(&hub, &fleet, &shop).await.len() as u64;
    assert!(people >= 20, "{people} registered");
    let relay = hub.relay_url();
    let bearer = format!("Bearer {key}");
    let auth = [("Authorization", bearer.as_str())];

    // Bad input is refused naming the field; nothing is added.
    for (body, field) in [
        (json!({"url": "ftp://example.com/hook"}), "url"),
        (json!({"url": "https://user:pw@example.com/hook"}), "url"),
        (
            json!({"url": "http://127.0.0.1:9/hook", "message_id": "msg_nobody"}),
            "message_id",
        ),
    ] {
        let reply = call(&relay, "POST", "/v1/webhooks", &auth, Some(&body)).await;
        assert!(reply.status == 400 || reply.status == 404, "{}", reply.body);
        assert_eq!(reply.json()["field"], field, "{}", reply.body);
    }
    let bad_type = json!({"url": "http://127.0.0.1:9/hook", "types": ["recipient.teleported"]});
    let reply = call(&relay, "POST", "/v1/webhooks", &auth, Some(&bad_type)).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    let listed = call(&relay, "GET", "/v1/webhooks", &auth, None).await;
    assert_eq!(listed.json()["webhooks"], json!([]), "nothing was added");

    // Two endpoints, each with its own receiver.
    let dir = tempfile::tempdir().unwrap();
    let mut endpoints = Vec::new();
    for name in ["flaky", "leaving"] {
        let port = free_port().unwrap();
        let body = json!({"url": format!("http://127.0.0.1:{port}/hooks/{name}")});
        let reply = call(&relay, "POST", "/v1/webhooks", &auth, Some(&body)).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let created = reply.json();
        let secret = created["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("whsec_"), "{created}");
        assert_eq!(created["state"], "enabled");
        assert_eq!(created["types"].as_array().unwrap().len(), 11);
        let id = created["webhook_id"].as_str().unwrap().to_owned();
        // The secret is shown once.
        let again = call(&relay, "GET", &format!("/v1/webhooks/{id}"), &auth, None).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert!(again.json().get("secret").is_none(), "{}", again.body);
        endpoints.push((id, port, secret, dir.path().join(format!("{name}.jsonl"))));
    }
    let (flaky_id, flaky_port, flaky_secret, flaky_out) = endpoints[0].clone();
    let (leaving_id, leaving_port, leaving_secret, leaving_out) = endpoints[1].clone();
    let mut flaky = receiver(
        &python,
        flaky_port,
        &flaky_secret,
        &flaky_out,
        "503,503,slow,crash",
    );
    let leaving_receiver = receiver(&python, leaving_port, &leaving_secret, &leaving_out, "410");

    // A campaign to everyone; every person opens it.
    let body = json!({"target": {"all_registered": true}, "content": {"text": "spring sale"}, "channel": "sms"});
    let sent = call(&relay, "POST", "/v1/messages", &auth, Some(&body)).await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    let message_id = sent.json()["message_id"].as_str().unwrap().to_owned();
    let status = hub
        .wait_for_message(&key, &message_id, |s| {
            s.matched == people && s.opened == people && s.delivered == people
        })
        .await;

    // The flaky receiver crashed on its fourth request; start it again.
    eventually(
        "the flaky receiver's crash",
        Duration::from_secs(60),
        || {
            let exited = flaky.has_exited();
            async move { exited.then_some(()) }
        },
    )
    .await;
    flaky = receiver(&python, flaky_port, &flaky_secret, &flaky_out, "");

    // Everything arrives, each event once after de-duplication.
    let expected: HashMap<&str, u64> = HashMap::from([
        ("recipient.handed_over", status.handed_over),
        ("recipient.delivered", status.delivered),
        ("recipient.opened", status.opened),
        ("message.accepted", 1),
        ("message.expanded", 1),
        ("message.handed_over", 1),
    ]);
    let events = eventually(
        "every event at the flaky endpoint",
        Duration::from_secs(60),
        || {
            let events = unique_events(&received(&flaky_out));
            let mut counts: HashMap<String, u64> = HashMap::new();
            for event in events.values() {
                *counts
                    .entry(event["type"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            let done = expected
                .iter()
                .all(|(kind, n)| counts.get(*kind).copied().unwrap_or(0) == *n)
                && counts.len() == expected.len();
            async move { done.then_some(events) }
        },
    )
    .await;
    assert_eq!(
        events.len() as u64,
        people * 3 + 3,
        "each person's three events and the message's own three"
    );

    // One message: sequence numbers 1..=N without a gap, in the order the
    // events happened; per person, handed over < delivered < opened.
    let mut sequences: Vec<u64> = events
        .values()
        .map(|e| {
            assert_eq!(e["message_id"], message_id.as_str());
            e["sequence"].as_u64().unwrap()
        })
        .collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences,
        (1..=people * 3 + 3).collect::<Vec<_>>(),
        "gap-free"
    );
    // The message's own events: first accepted, then expanded with everyone
    // matched, then handed over once everyone was.
    let own = |kind: &str| {
        events
            .values()
            .find(|e| e["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let (accepted, expanded, handed_over) = (
        own("message.accepted"),
        own("message.expanded"),
        own("message.handed_over"),
    );
    assert_eq!(accepted["sequence"], 1, "{accepted}");
    assert!(expanded["sequence"].as_u64() < handed_over["sequence"].as_u64());
    assert_eq!(expanded["counts"]["matched"], people, "{expanded}");
    assert_eq!(
        handed_over["counts"]["handed_over"], people,
        "{handed_over}"
    );
    assert!(accepted.get("user_ref").is_none(), "{accepted}");
    let mut by_person: HashMap<&str, Vec<(u64, &str)>> = HashMap::new();
    for event in events.values().filter(|e| e.get("user_ref").is_some()) {
        by_person
            .entry(event["user_ref"].as_str().unwrap())
            .or_default()
            .push((
                event["sequence"].as_u64().unwrap(),
                event["type"].as_str().unwrap(),
            ));
    }
    assert_eq!(by_person.len() as u64, people);
    for (person, mut seen) in by_person {
        seen.sort_unstable();
        let order: Vec<&str> = seen.into_iter().map(|(_, kind)| kind).collect();
        assert_eq!(
            order,
            [
                "recipient.handed_over",
                "recipient.delivered",
                "recipient.opened"
            ],
            "{person}"
        );
    }
    // A retried batch came again under the same webhook id, with the same events.
    assert_batches_unchanged(&received(&flaky_out));

    // The flaky endpoint's attempts tell the story. (The receiver recorded
    // the batch it was too slow to answer: the relay may still be retrying
    // it, into the restarted receiver.)
    let attempts_path = format!("/v1/webhooks/{flaky_id}/attempts");
    let attempts = eventually(
        "a delivered attempt at the flaky endpoint",
        Duration::from_secs(60),
        || {
            let (relay, path, auth) = (relay.clone(), attempts_path.clone(), auth);
            async move {
                let attempts = call(&relay, "GET", &path, &auth, None).await.json();
                let delivered = attempts["attempts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["outcome"] == "delivered");
                delivered.then_some(attempts)
            }
        },
    )
    .await;
    let outcomes: HashSet<(String, Option<u64>)> = attempts["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap().to_owned(),
                a["status"].as_u64(),
            )
        })
        .collect();
    assert!(
        outcomes.contains(&("failed".to_owned(), Some(503))),
        "{attempts}"
    );
    assert!(
        outcomes.contains(&("failed".to_owned(), None)),
        "{attempts}"
    );
    assert!(
        outcomes.iter().any(|(outcome, _)| outcome == "delivered"),
        "{attempts}"
    );
    // The batch that failed was delivered in the end under its first id.
    let ids = |outcome: &str| -> HashSet<String> {
        attempts["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["outcome"] == outcome)
            .map(|a| a["webhook_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        !ids("failed").is_disjoint(&ids("delivered")),
        "a retried batch kept its webhook id: {attempts}"
    );
    let flaky_now = call(
        &relay,
        "GET",
        &format!("/v1/webhooks/{flaky_id}"),
        &auth,
        None,
    )
    .await
    .json();
    assert_eq!(flaky_now["state"], "enabled", "{flaky_now}");

    // The endpoint that answered 410 is disabled, says why, and got nothing.
    let leaving = call(
        &relay,
        "GET",
        &format!("/v1/webhooks/{leaving_id}"),
        &auth,
        None,
    )
    .await
    .json();
    assert_eq!(leaving["state"], "disabled", "{leaving}");
    assert!(
        leaving["disabled_reason"].as_str().unwrap().contains("410"),
        "{leaving}"
    );
    assert!(received(&leaving_out).is_empty());

    // Another enterprise sees neither endpoint.
    let (_, other_key) = hub.create_enterprise("other").await.unwrap();
    let other = format!("Bearer {other_key}");
    let reply = call(
        &relay,
        "GET",
        &format!("/v1/webhooks/{flaky_id}"),
        &[("Authorization", other.as_str())],
        None,
    )
    .await;
    assert_eq!(reply.status, 404, "{}", reply.body);

    // A rotated secret: the new one is shown once, and requests carry both
    // signatures while the old one is still valid.
    let rotated = call(
        &relay,
        "POST",
        &format!("/v1/webhooks/{flaky_id}/rotate-secret"),
        &auth,
        Some(&json!({"previous_valid_for_secs": 3600})),
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let new_secret = rotated.json()["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, flaky_secret);
    // The running receiver still knows only the old secret: a second
    // campaign verifies against it during the overlap.
    let body = json!({"target": {"all_registered": true}, "content": {"text": "last day"}, "channel": "sms"});
    let sent = call(&relay, "POST", "/v1/messages", &auth, Some(&body)).await;
    let second = sent.json()["message_id"].as_str().unwrap().to_owned();
    eventually(
        "the second campaign's events under the old secret",
        Duration::from_secs(60),
        || {
            let done = count_of(&flaky_out, &second) >= people;
            async move { done.then_some(()) }
        },
    )
    .await;

    // Through the CLI (gRPC): the endpoints as listed; a bad type named.
    let cli = |command| enterprise_cli::Cli {
        relay_url: relay.clone(),
        tls_ca: None,
        api_key: Some(key.clone()),
        json: true,
        command: enterprise_cli::Command::Webhooks(command),
    };
    use enterprise_cli::cmd::webhooks::WebhooksCommand;
    let mut out = Vec::new();
    enterprise_cli::run(cli(WebhooksCommand::List), &mut out)
        .await
        .unwrap();
    let listed: Value = serde_json::from_slice(&out).unwrap();
    let states: HashMap<&str, bool> = listed["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["webhook_id"].as_str().unwrap(),
                w["enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        HashMap::from([(flaky_id.as_str(), true), (leaving_id.as_str(), false)])
    );
    let refused = enterprise_cli::run(
        cli(WebhooksCommand::Add {
            url: "https://hooks.example.com/x".into(),
            types: vec!["recipient.opened".into(), "recipient.kissed".into()],
            message_id: None,
        }),
        &mut Vec::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("types[1]"), "{refused}");

    // The endpoint that left comes back: replayed, it gets everything it
    // missed while disabled, from where delivery stopped.
    leaving_receiver.terminate(Duration::from_secs(5)).unwrap();
    let leaving_receiver = receiver(&python, leaving_port, &leaving_secret, &leaving_out, "");
    let mut out = Vec::new();
    enterprise_cli::run(
        cli(WebhooksCommand::Replay {
            webhook_id: leaving_id.clone(),
        }),
        &mut out,
    )
    .await
    .unwrap();
    let resumed: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(resumed["webhooks"][0]["enabled"], true, "{resumed}");
    eventually(
        "the replayed endpoint's events",
        Duration::from_secs(60),
        || {
            let done = count_of(&leaving_out, &message_id) == people * 3 + 3;
            async move { done.then_some(()) }
        },
    )
    .await;

    for process in [flaky, leaving_receiver] {
        let status = process.terminate(Duration::from_secs(5)).unwrap();
        assert!(status.success() || status.code().is_none(), "{status}");
    }
    hub.shutdown().await.unwrap();
}

/// A hub (`settings`) with an enterprise whose people are all registered
/// and open everything, one endpoint for all its events and a receiver
/// (`script`) behind it.
struct Hooked {
    hub: Hub,
    key: String,
    people: u64,
    receiver: Process,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

async fn hooked(backend: Backend, script: &str) -> Option<Hooked> {
    let Some(python) = std::env::var_os(PYTHON_ENV).map(PathBuf::from) else {
        eprintln!("{PYTHON_ENV} unset: the webhook receivers are not started");
        return None;
    };
    let settings = Settings {
        webhook_retry_schedule: "200ms".parse().unwrap(),
        webhook_timeout_secs: 1,
        ..Default::default()
    };
    let mut hub = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()?;
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(5, 80, &["alpha".into()]);
    hub.start_fleet(
        fleet.clone(),
        vec![EnterpriseChoice::enterprise(&shop)],
        OpenMode::Always,
    )
    .await
    .unwrap();
    let people = refs_by_user(&hub, &fleet, &shop).await.len() as u64;
    let port = free_port().unwrap();
    let body = json!({"url": format!("http://127.0.0.1:{port}/hooks")});
    let auth = format!("Bearer {key}");
    let reply = call(
        &hub.relay_url(),
        "POST",
        "/v1/webhooks",
        &[("Authorization", auth.as_str())],
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let secret = reply.json()["secret"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("received.jsonl");
    let receiver = receiver(&python, port, &secret, &out, script);
    Some(Hooked {
        hub,
        key,
        people,
        receiver,
        out,
        _dir: dir,
    })
}

impl Hooked {
    /// Sends a campaign to everyone; its id.
    async fn campaign(&self) -> String {
        self.send(json!({"target": {"all_registered": true}, "content": {"text": "sale"}, "channel": "sms"}))
            .await
    }

    /// Sends `body` (`POST /v1/messages`); the message's id.
    async fn send(&self, body: Value) -> String {
        let auth = format!("Bearer {}", self.key);
        let sent = call(
            &self.hub.relay_url(),
            "POST",
            "/v1/messages",
            &[("Authorization", auth.as_str())],
            Some(&body),
        )
        .await;
        assert_eq!(sent.status, 201, "{}", sent.body);
        sent.json()["message_id"].as_str().unwrap().to_owned()
    }

    /// Waits until every person's three events of `message_id` and its own
    /// three arrived; the requests received.
    async fn all_received(&self, message_id: &str) -> Vec<Value> {
        let want = self.people * 3 + 3;
        eventually("every event", Duration::from_secs(60), || {
            let done = count_of(&self.out, message_id) == want;
            async move { done.then(|| received(&self.out)) }
        })
        .await
    }

    async fn close(self) {
        self.receiver.terminate(Duration::from_secs(5)).unwrap();
        self.hub.shutdown().await.unwrap();
    }
}

/// Two relays on one database: each batch is sent by one of them, once.
async fn two_relays_send_each_batch_once(backend: Backend) {
    let Some(mut hooked) = hooked(backend, "").await else {
        return;
    };
    hooked.hub.start_replica().await.unwrap();
    let message_id = hooked.campaign().await;
    let lines = hooked.all_received(&message_id).await;
    let mut ids = HashSet::new();
    for line in &lines {
        let id = line["webhook_id"].as_str().unwrap();
        assert!(ids.insert(id), "batch {id} was sent twice");
    }
    hooked.close().await;
}

/// The relay killed (its runtime dropped, as by SIGKILL) while the
/// endpoint holds a batch: after the restart the batch comes again under
/// the same id with the same events, and every event arrives.
async fn a_relay_killed_mid_delivery_loses_no_webhook_event(backend: Backend) {
    let Some(mut hooked) = hooked(backend, "slow").await else {
        return;
    };
    let message_id = hooked.campaign().await;
    eventually("the first request", Duration::from_secs(60), || {
        let any = !received(&hooked.out).is_empty();
        async move { any.then_some(()) }
    })
    .await;
    hooked.hub.kill_and_restart_relay().await.unwrap();
    let lines = hooked.all_received(&message_id).await;
    // No event's copies differ, and a batch sent again is the same batch.
    unique_events(&lines);
    assert_batches_unchanged(&lines);
    hooked.close().await;
}

/// A message that expires closes with a `message.completed` event carrying
/// its final counts, after every person's events.
async fn a_message_completes_with_its_final_counts(backend: Backend) {
    let Some(hooked) = hooked(backend, "").await else {
        return;
    };
    let expires =
        chukei_proto::clock::rfc3339(chukei_proto::clock::Clock::system().now_ms() + 4_000);
    let message_id = hooked
        .send(
            json!({"target": {"all_registered": true}, "content": {"text": "today only"},
                     "channel": "sms", "expires_at": expires}),
        )
        .await;
    let completed = eventually("message.completed", Duration::from_secs(60), || {
        let events = unique_events(&received(&hooked.out));
        let completed = events
            .values()
            .find(|e| e["type"] == "message.completed" && e["message_id"] == message_id.as_str())
            .cloned();
        async move { completed.map(|c| (c, events)) }
    })
    .await;
    let (completed, events) = completed;
    let people = hooked.people;
    assert_eq!(
        completed["counts"],
        json!({"matched": people, "handed_over": people, "delivered": people, "opened": people,
               "failed": 0, "expired": 0, "unsupported": 0, "skipped": 0, "deferred": 0}),
        "{completed}"
    );
    let last = events
        .values()
        .filter(|e| e["message_id"] == message_id.as_str())
        .map(|e| e["sequence"].as_u64().unwrap())
        .max();
    assert_eq!(completed["sequence"].as_u64(), last, "completed comes last");
    hooked.close().await;
}

backend_tests!(
    webhooks_reach_receivers_that_fail_crash_and_leave,
    a_message_completes_with_its_final_counts,
    two_relays_send_each_batch_once,
    a_relay_killed_mid_delivery_loses_no_webhook_event,
);
