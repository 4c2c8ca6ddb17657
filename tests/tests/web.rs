//! The web pages in a real browser: Playwright (PyPI `playwright`) driving
//! Debian's Chromium (`tests/python/web_pages.py`), on both backends.
//!
//! A subscriber signs in to their carrier's consent page with a one-time
//! code that reaches their phone (the simulated terminal), on a phone-sized
//! screen, in Japanese and then English; narrows their age from the exact
//! age to the decade (previewed first) — and the relay's stored profile
//! changes to exactly that —; withdraws, and a segment message that would
//! have chosen them no longer reaches them; reads their history; leaves the
//! enterprise (their registration is gone at the relay) and the hub (they
//! are erased: no contract left). An
//! enterprise signs in to the console, quotes and sends a campaign, and
//! watches its funnel until everyone opened — each number exactly what
//! `GetMessage` returns, the channel breakdown and the open-rate page exactly
//! what `GetStats` returns —; explains one ref; another enterprise's message
//! is not found and a forged form is refused. The operator sees the
//! carriers. Every page is screenshot (`target/screenshots/<backend>/`) and
//! checked with axe-core: no serious or critical violation.
//!
//! Needs `CHUKEI_TEST_PYTHON` (with `playwright`), `CHUKEI_TEST_CHROMIUM`
//! (Debian's `/usr/bin/chromium`) and `CHUKEI_TEST_AXE` (axe-core's
//! `axe.min.js`), as `.ci/run` installs; without them it says so and does
//! nothing. With `CHUKEI_UPDATE_DOCS=1` the SQLite run copies the two
//! screenshots the README shows into `docs/images/`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chukei_proto::carrier::v1 as cpb;
use chukei_proto::carrier::v1::subscriber_api_client::SubscriberApiClient;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::{
    Backend, Hub, Settings, backend_tests, eventually, send_request, sql_scalar,
};
use serde_json::{Value, json};
use terminal_sim::fleet::{Fleet, SimUser};
use terminal_sim::terminal::OpenMode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

backend_tests!(
    subscriber_and_enterprise_pages_in_a_real_browser,
    the_consent_page_trusts_the_operators_login_header
);

/// What the browser run needs from the machine, or `None` (said) when absent.
fn browser() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let python = integration_tests::peers::python("the browser test")?;
    let (Some(chromium), Some(axe)) = (
        std::env::var_os("CHUKEI_TEST_CHROMIUM"),
        std::env::var_os("CHUKEI_TEST_AXE"),
    ) else {
        eprintln!("CHUKEI_TEST_CHROMIUM or CHUKEI_TEST_AXE unset: the browser test skipped");
        return None;
    };
    Some((python, chromium.into(), axe.into()))
}

fn share_all() -> cpb::ConsentChoices {
    cpb::ConsentChoices {
        gender: true,
        age: cpb::AgeGranularity::Exact as i32,
        region: cpb::RegionGranularity::City as i32,
        occupation: true,
    }
}

/// `count` people on carrier alpha with every channel, each of the age
/// (whatever today is) and in the region `place` gives for their index.
fn people(seed: u64, count: usize, place: impl Fn(usize) -> (i32, &'static str)) -> Fleet {
    let year: i32 = jiff::Zoned::now().year().into();
    let mut fleet = Fleet::generate(seed, count, &["alpha".into()]).with_every_channel();
    for (index, user) in fleet.users.iter_mut().enumerate() {
        let (age, region) = place(index);
        user.behaviour.away_share = 0.0;
        user.birth_date = format!("{}-01-01", year - age);
        user.home_region = region.into();
    }
    fleet
}

/// Registers `users` with `enterprise_id` through the carrier, sharing
/// everything at the finest grain; their refs, in order.
async fn register_sharing_all(hub: &Hub, users: &[SimUser], enterprise_id: &str) -> Vec<String> {
    SubscriberApiClient::connect(hub.carriers[0].url())
        .await
        .unwrap()
        .register(cpb::RegisterRequest {
            registrations: users
                .iter()
                .map(|u| cpb::SubscriberRegistration {
                    user_id: u.user_id.clone(),
                    enterprise_id: enterprise_id.into(),
                    service_id: String::new(),
                    consent: Some(share_all()),
                    text_version: carrier_svc::consent::TEXT_VERSION.into(),
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .user_refs
}

/// `+8190…` as a person in Japan writes it: `090-xxxx-xxxx`.
fn national(number: &str) -> String {
    let digits = number.strip_prefix("+81").expect("a Japanese number");
    format!("0{}-{}-{}", &digits[..2], &digits[2..6], &digits[6..])
}

async fn subscriber_and_enterprise_pages_in_a_real_browser(backend: Backend) {
    let Some((python, chromium, axe)) = browser() else {
        return;
    };
    let settings = Settings {
        consent_pages: true,
        min_cohort: 5,
        ..Settings::default()
    };
    let Some(mut hub) = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()
    else {
        return;
    };
    // 20 people: 14 of 36 in Shibuya, 6 of 56 in Osaka (a segment must
    // leave the minimum cohort out).
    let fleet = people(11, 20, |index| {
        if index < 14 {
            (36, "tokyo/shibuya")
        } else {
            (56, "osaka/kita")
        }
    });
    let terminals = hub
        .start_fleet(fleet.clone(), vec![], OpenMode::Always)
        .await
        .unwrap();
    let (shop, key) = hub.create_enterprise("Sakura Mart").await.unwrap();
    let (_, other_key) = hub.create_enterprise("other").await.unwrap();
    let refs = register_sharing_all(&hub, &fleet.users, &shop).await;
    let subject = &fleet.users[0];
    let mut client = hub.enterprise(&key).await.unwrap();
    let mut other = hub.enterprise(&other_key).await.unwrap();
    let other_message = other
        .send_message(send_request(
            "other-1",
            pb::target::Kind::AllRegistered(true),
            "not yours",
            common::Channel::Sms,
        ))
        .await
        .unwrap()
        .into_inner()
        .message_id;
    let store = relay_svc::storage::Store::connect(hub.database_url())
        .await
        .unwrap();
    let age_range = |user_id: String| {
        let store = store.clone();
        async move {
            sql_scalar(
                &store,
                "SELECT COALESCE(MAX(age_min * 1000 + age_max), -1) FROM profiles WHERE user_id = $1",
                &user_id,
            )
            .await
        }
    };
    let rows_of = |table: &'static str| {
        let store = store.clone();
        let user_id = subject.user_id.clone();
        async move {
            let sql = format!("SELECT COUNT(*) FROM {table} WHERE user_id = $1");
            sql_scalar(&store, &sql, &user_id).await
        }
    };
    assert_eq!(age_range(subject.user_id.clone()).await, 36_036);

    let screenshots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/screenshots")
        .join(format!("{backend:?}").to_lowercase());
    let mut browser = tokio::process::Command::new(&python)
        .arg(format!(
            "{}/python/web_pages.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([
            "--chromium",
            &chromium.display().to_string(),
            "--axe",
            &axe.display().to_string(),
            "--screenshots",
            &screenshots.display().to_string(),
            "--consent-url",
            &format!("http://{}", hub.carriers[0].consent.unwrap()),
            "--console-url",
            &hub.relay_url(),
            "--phone-local",
            &national(&subject.phone_number),
            "--enterprise",
            &shop,
            "--enterprise-name",
            "Sakura Mart",
            "--api-key",
            &key,
            "--operator-token",
            integration_tests::ADMIN_TOKEN,
            "--other-message-id",
            &other_message,
            "--user-ref",
            &refs[1],
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut to_browser = browser.stdin.take().unwrap();
    let mut from_browser = BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut steps = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(180), from_browser.next_line())
            .await
            .expect("the browser run answers within 3 minutes")
            .unwrap()
            .expect("the browser run ends with a done line");
        let said: Value = serde_json::from_str(&line).unwrap();
        let step = said["step"]
            .as_str()
            .or(said["need"].as_str())
            .unwrap()
            .to_owned();
        steps.push(step.clone());
        let answer = match step.as_str() {
            "code" => {
                // The code reached the person's phone as the carrier's own SMS.
                let text = eventually(
                    "the sign-in code at the terminal",
                    Duration::from_secs(10),
                    || {
                        let inbox = terminals.inbox(&subject.user_id);
                        async move {
                            inbox
                                .into_iter()
                                .find(|item| item.message_id.is_empty())
                                .map(|item| item.text)
                        }
                    },
                )
                .await;
                let code: String = text
                    .split("code: ")
                    .nth(1)
                    .unwrap()
                    .chars()
                    .take(6)
                    .collect();
                json!({"code": code})
            }
            "narrowed" => {
                // The relay now holds the decade, nothing finer.
                assert_eq!(age_range(subject.user_id.clone()).await, 30_039);
                json!({"ok": true})
            }
            "withdrew" => {
                assert_eq!(age_range(subject.user_id.clone()).await, -1);
                let sent = client
                    .send_message(send_request(
                        "thirties",
                        pb::target::Kind::Segment(pb::Segment {
                            age_min: Some(30),
                            age_max: Some(39),
                            regions: vec!["tokyo".into()],
                            ..Default::default()
                        }),
                        "for people in their thirties",
                        common::Channel::Sms,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let message_id = sent.message_id.clone();
                eventually(
                    "the segment message at 13 phones",
                    Duration::from_secs(30),
                    || {
                        let got = terminals.recipients(&message_id);
                        async move { (got.len() == 13).then_some(()) }
                    },
                )
                .await;
                assert!(
                    !terminals
                        .recipients(&sent.message_id)
                        .contains_key(&subject.user_id)
                );
                json!({"ok": true})
            }
            "left" => {
                // No registration of the person at the relay any more.
                assert_eq!(rows_of("registrations").await, 0);
                json!({"ok": true})
            }
            "left_hub" => {
                // Erased at the relay: no contract left to route by.
                assert_eq!(rows_of("contracts").await, 0);
                json!({"ok": true})
            }
            "quoted" => {
                let quote = client
                    .quote_message(send_request(
                        "quote",
                        pb::target::Kind::AllRegistered(true),
                        "x",
                        common::Channel::Sms,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(said["recipients"], json!(quote.recipients));
                // Everyone registered but the subject, who left.
                assert_eq!(quote.recipients, 19);
                json!({"ok": true})
            }
            "funnel" => {
                let message_id = said["message_id"].as_str().unwrap().to_owned();
                let status = client
                    .get_message(pb::GetMessageRequest {
                        message_id: message_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let numbers = &said["numbers"];
                for (label, value) in [
                    ("Matched", status.matched),
                    ("Handed over", status.handed_over),
                    ("Delivered", status.delivered),
                    ("Opened", status.opened),
                    ("Failed", status.failed),
                    ("Expired", status.expired),
                    ("Unsupported channel", status.unsupported),
                    ("Deferred (quiet period)", status.deferred),
                    ("Skipped (fatigue, budget)", status.skipped),
                ] {
                    assert_eq!(numbers[label], json!(value), "{label} on the page");
                }
                assert_eq!(status.opened, 19);
                assert_eq!(
                    said["by_channel"],
                    json!({"SMS": [status.handed_over, status.delivered, status.opened]})
                );
                // Before the open-rate page is read: the fold has caught up.
                eventually("the rollup fold caught up", Duration::from_secs(30), || {
                    let store = store.clone();
                    async move {
                        (sql_scalar(
                            &store,
                            "SELECT COUNT(*) FROM unfolded_events WHERE message_id <> $1",
                            "",
                        )
                        .await
                            == 0)
                            .then_some(())
                    }
                })
                .await;
                json!({"ok": true})
            }
            "stats" => {
                let stats = client
                    .get_stats(pb::GetStatsRequest {
                        by: vec![pb::StatsDimension::Channel as i32],
                        zone: said["zone"].as_str().unwrap().to_owned(),
                        lookback: Some(prost_types::Duration {
                            seconds: 7 * 86_400,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let expected: HashMap<String, Value> = stats
                    .rows
                    .iter()
                    .map(|row| {
                        (
                            row.key.join(" "),
                            json!([row.sent, row.delivered, row.opened]),
                        )
                    })
                    .collect();
                assert!(!expected.is_empty());
                assert_eq!(said["by_channel"], json!(expected));
                json!({"ok": true})
            }
            "done" => {
                assert_eq!(
                    said["violations"],
                    json!({}),
                    "axe-core found serious violations"
                );
                break;
            }
            other => panic!("unexpected step {other}: {line}"),
        };
        to_browser
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .unwrap();
        to_browser.flush().await.unwrap();
    }
    let status = browser.wait().await.unwrap();
    assert!(status.success(), "the browser run failed: {status}");
    assert_eq!(
        steps,
        [
            "code", "narrowed", "withdrew", "left", "left_hub", "quoted", "funnel", "stats", "done"
        ]
    );
    if backend == Backend::Sqlite && std::env::var_os("CHUKEI_UPDATE_DOCS").is_some() {
        let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/images");
        std::fs::create_dir_all(&images).unwrap();
        for name in ["consent-preview", "console-message"] {
            std::fs::copy(
                screenshots.join(format!("{name}.png")),
                images.join(format!("{name}.png")),
            )
            .unwrap();
        }
    }
    hub.shutdown().await.unwrap();
}

/// With `--consent-sign-in header` the page takes the subscriber from the
/// header the operator's login sets (no code, no cookie of ours), and a
/// form's CSRF token is bound to that subscriber.
async fn the_consent_page_trusts_the_operators_login_header(backend: Backend) {
    use integration_tests::http::{call, post_form};
    let settings = Settings {
        consent_pages: true,
        consent_header: Some("x-chukei-subscriber".into()),
        ..Settings::default()
    };
    let Some(mut hub) = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()
    else {
        return;
    };
    let fleet = people(12, 2, |_| (36, "tokyo/shibuya"));
    hub.start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let (shop, _) = hub.create_enterprise("Sakura Mart").await.unwrap();
    register_sharing_all(&hub, &fleet.users[..1], &shop).await;
    let page = format!("http://{}", hub.carriers[0].consent.unwrap());
    let me = [("x-chukei-subscriber", fleet.users[0].user_id.as_str())];
    let someone_else = [("x-chukei-subscriber", fleet.users[1].user_id.as_str())];

    assert_eq!(call(&page, "GET", "/", &[], None).await.status, 401);
    let home = call(&page, "GET", "/", &me, None).await;
    assert_eq!(home.status, 200);
    // The enterprise as people know it (its name, from the relay).
    assert!(home.body.contains("Sakura Mart"), "{}", home.body);
    assert!(home.body.contains(&shop), "{}", home.body);
    assert!(
        home.header("set-cookie")
            .is_none_or(|c| !c.contains("chukei_consent"))
    );
    assert_eq!(
        home.header("content-security-policy")
            .map(|v| v.starts_with("default-src 'none'")),
        Some(true)
    );
    let csrf = home
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let form = format!(
        "csrf={csrf}&gender=none&age=decade&region=prefecture&occupation=none&text_version={}",
        carrier_svc::consent::TEXT_VERSION
    );
    let path = format!("/enterprises/{shop}/consent");
    // The token is this subscriber's: under another's header it changes nothing.
    let forged = post_form(&page, &path, &someone_else, &form).await;
    assert!(forged.body.contains("expired"), "{}", forged.body);
    let saved = post_form(&page, &path, &me, &form).await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let store = relay_svc::storage::Store::connect(hub.database_url())
        .await
        .unwrap();
    let stored = sql_scalar(
        &store,
        "SELECT COUNT(*) FROM profiles WHERE user_id = $1 AND age_min = 30 AND age_max = 39 AND region = 'tokyo'",
        &fleet.users[0].user_id,
    )
    .await;
    assert_eq!(stored, 1);
    hub.shutdown().await.unwrap();
}
