//! Analytics on every backend: the rollups answer each breakdown with the
//! figures of a small dataset checked by hand, equal a recount from the
//! events however receipts arrive, withhold small attribute cells, and
//! reconciliation flags a carrier whose reports disagree with its receipts.
//! End to end: `GetStats` and `enterprise-cli stats` over a real campaign
//! show what the terminals saw.

use std::collections::HashMap;

use chukei_proto::relay::v1 as pb;
use integration_tests::scene::*;
use integration_tests::{Backend, Settings, backend_tests, store};
use relay_svc::policy::{AttentionConfig, Policy, Priority, SendTime, Timing};
use relay_svc::receipts::{CountReport, EventKind, MessageCount, Receipt};
use relay_svc::registry::{Gender, NewRegistration, Profile};
use relay_svc::stats::{self, Dimension, Query, Thresholds, Viewer};
use relay_svc::storage::Store;
use relay_svc::targeting::{Channel, Content, NewMessage, Target};

/// 2026-11-26T00:00:00Z, a Thursday.
const T0: i64 = 1_795_651_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Twelve people u01–u12 with these consented profiles:
/// gender f (odd) / m (even); age 20–29 (u01–u06) / exactly 33 (u07–u12);
/// region tokyo/shibuya (u01–u08) / osaka (u09–u12); occupation student
/// (u01–u04) / not shared.
async fn seed(store: &Store) -> HashMap<String, String> {
    store
        .create_enterprise("ent_1", "shop", "hash-1", 0)
        .await
        .unwrap();
    store
        .upsert_carrier("c1", "http://127.0.0.1:1", "token-c1", 0)
        .await
        .unwrap();
    let users: Vec<String> = (1..=12).map(|i| format!("u{i:02}")).collect();
    integration_tests::contract_primary(store, "c1", &users, 0)
        .await
        .unwrap();
    let registrations: Vec<NewRegistration> = (1..=12)
        .map(|i| NewRegistration {
            user_id: format!("u{i:02}"),
            enterprise_id: "ent_1".into(),
            service_id: None,
            profile: Profile {
                gender: Some(if i % 2 == 1 {
                    Gender::Female
                } else {
                    Gender::Male
                }),
                age: Some(if i <= 6 { (20, 29) } else { (33, 33) }),
                region: Some(if i <= 8 { "tokyo/shibuya" } else { "osaka" }.into()),
                occupation: (i <= 4).then(|| "student".into()),
            },
            text_version: "v1".into(),
        })
        .collect();
    let refs = store.register_users("c1", &registrations, 0).await.unwrap();
    users.into_iter().zip(refs).collect()
}

/// Sends `message_id` on `channel` to `users`, hands it over at `at`.
async fn send(store: &Store, message_id: &str, channel: Channel, refs: Vec<String>, at: i64) {
    let message = NewMessage {
        idempotency_key: message_id.into(),
        target: Target::Refs(refs),
        content: Content {
            text: "hi".into(),
            ..Content::default()
        },
        policy: Policy::fixed(Some(channel)),
        all_carriers: false,
        timing: Timing::default(),
        follow_up: None,
        priority: Priority::Normal,
        bid_id: None,
        trace_parent: String::new(),
    };
    store
        .accept_message(
            "ent_1",
            message_id,
            &message,
            at,
            at + 7 * DAY,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    let due = store.due_deliveries("c1", 0, at, 100).await.unwrap();
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    store.mark_handed_over(&ids, at).await.unwrap();
}

fn receipt(
    message_id: &str,
    user: usize,
    kind: EventKind,
    channel: Channel,
    at: i64,
    place: &str,
) -> Receipt {
    Receipt {
        delivery_id: None,
        message_id: message_id.into(),
        user_id: format!("u{user:02}"),
        kind,
        channel: Some(channel),
        at,
        region: place.into(),
    }
}

/// The dataset: `m1` by SMS to all twelve on Thursday 00:10 UTC (delivered
/// in tokyo to u01–u10 and osaka to u11–u12; opened by u01–u06 at 02:xx and
/// u07–u08 at 03:xx); `m2` by RCS to u01–u04 on Friday 00:10 (all delivered in
/// tokyo, opened by u01 at 01:xx). Receipts arrive duplicated, reordered, and
/// reads before deliveries.
async fn dataset(store: &Store) -> HashMap<String, String> {
    let refs = seed(store).await;
    let ref_of = |i: usize| refs[&format!("u{i:02}")].clone();
    let t1 = T0 + 10 * 60_000;
    send(
        store,
        "m1",
        Channel::Sms,
        (1..=12).map(ref_of).collect(),
        t1,
    )
    .await;
    let mut receipts = Vec::new();
    for user in (1..=12).rev() {
        let place = if user <= 10 { "tokyo" } else { "osaka" };
        let opened_at = match user {
            1..=6 => Some(t1 + 2 * HOUR),
            7 | 8 => Some(t1 + 3 * HOUR),
            _ => None,
        };
        if let Some(at) = opened_at.filter(|_| user <= 3) {
            // The read arrives before its delivered receipt.
            receipts.push(receipt(
                "m1",
                user,
                EventKind::Opened,
                Channel::Sms,
                at,
                place,
            ));
        }
        receipts.push(receipt(
            "m1",
            user,
            EventKind::Delivered,
            Channel::Sms,
            t1 + 60_000,
            place,
        ));
        if let Some(at) = opened_at {
            receipts.push(receipt(
                "m1",
                user,
                EventKind::Opened,
                Channel::Sms,
                at,
                place,
            ));
        }
    }
    // Everything twice, in two batches.
    let (first, second) = receipts.split_at(receipts.len() / 2);
    for batch in [first, second, second, first] {
        store.record_receipts("c1", batch, t1).await.unwrap();
    }

    let t2 = t1 + DAY;
    send(store, "m2", Channel::Rcs, (1..=4).map(ref_of).collect(), t2).await;
    let mut receipts: Vec<Receipt> = (1..=4)
        .map(|user| {
            receipt(
                "m2",
                user,
                EventKind::Delivered,
                Channel::Rcs,
                t2 + 60_000,
                "tokyo",
            )
        })
        .collect();
    receipts.push(receipt(
        "m2",
        1,
        EventKind::Opened,
        Channel::Rcs,
        t2 + HOUR,
        "tokyo",
    ));
    receipts.extend(receipts.clone());
    store.record_receipts("c1", &receipts, t2).await.unwrap();
    fold_queued(store).await;
    refs
}

/// What the relay's rollup worker does: folds every event in.
async fn fold_queued(store: &Store) {
    store.roll_up_all(7, 0).await.unwrap();
    assert_eq!(store.roll_up_backlog().await.unwrap(), 0);
}

/// Rows of a breakdown as (key joined by " / ", sent, delivered, opened);
/// suppressed rows as ("… (withheld)", 0, 0, 0).
async fn rows(
    store: &Store,
    viewer: &Viewer,
    by: &[Dimension],
    zone: &str,
) -> Vec<(String, u64, u64, u64)> {
    let query = Query::new(by.to_vec(), T0 - DAY, T0 + 3 * DAY, zone, viewer).unwrap();
    let thresholds = Thresholds {
        min_cohort: 5,
        min_sample: 30,
    };
    relay_svc::service::breakdown(store, viewer, &query, thresholds)
        .await
        .unwrap()
        .into_iter()
        .map(|row| {
            let mut key = row.key.join(" / ");
            if row.suppressed {
                key.push_str(" (withheld)");
            }
            (key, row.sent, row.delivered, row.opened)
        })
        .collect()
}

fn expect(rows: &[(&str, u64, u64, u64)]) -> Vec<(String, u64, u64, u64)> {
    rows.iter()
        .map(|(k, s, d, o)| ((*k).to_owned(), *s, *d, *o))
        .collect()
}

async fn every_breakdown_matches_a_hand_checked_dataset(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = dataset(store).await;
    let shop = Viewer::Enterprise("ent_1".into());
    use Dimension::*;

    assert_eq!(
        rows(store, &shop, &[], "").await,
        expect(&[("", 16, 16, 9)])
    );
    assert_eq!(
        rows(store, &shop, &[Channel], "").await,
        expect(&[("rcs", 4, 4, 1), ("sms", 12, 12, 8)])
    );
    assert_eq!(
        rows(store, &shop, &[Gender], "").await,
        expect(&[("female", 8, 8, 5), ("male", 8, 8, 4)])
    );
    assert_eq!(
        rows(store, &shop, &[Age], "").await,
        expect(&[("20s", 10, 10, 7), ("30s", 6, 6, 2)])
    );
    // Attributes by day come from the audience cube, days read in the zone.
    // A cell below the cohort (4) takes the next smallest with it, or the
    // total less the shown cells would give it.
    assert_eq!(
        rows(store, &shop, &[Age, Day], "Asia/Tokyo").await,
        expect(&[
            ("20s / 2026-11-26 (withheld)", 0, 0, 0),
            ("20s / 2026-11-27 (withheld)", 0, 0, 0),
            ("30s / 2026-11-26", 6, 6, 2)
        ])
    );
    assert_eq!(
        rows(store, &shop, &[Region], "").await,
        expect(&[
            ("osaka (withheld)", 0, 0, 0),
            ("tokyo/shibuya (withheld)", 0, 0, 0)
        ])
    );
    assert_eq!(
        rows(store, &shop, &[Occupation], "").await,
        expect(&[("-", 8, 8, 4), ("student", 8, 8, 5)])
    );
    // Sends have no place; deliveries and opens are where the terminal was.
    assert_eq!(
        rows(store, &shop, &[Place], "").await,
        expect(&[
            ("-", 16, 0, 0),
            ("osaka (withheld)", 0, 0, 0),
            ("tokyo (withheld)", 0, 0, 0)
        ])
    );
    assert_eq!(
        rows(store, &shop, &[Day, Weekday, SendHour], "").await,
        expect(&[
            ("2026-11-26 / Thu / 00", 12, 12, 8),
            ("2026-11-27 / Fri / 00", 4, 4, 1)
        ])
    );
    assert_eq!(
        rows(store, &shop, &[SendHour], "Asia/Tokyo").await,
        expect(&[("09", 16, 16, 9)])
    );
    assert_eq!(
        rows(store, &shop, &[Channel, OpenHour], "").await,
        expect(&[
            ("rcs / 01", 4, 4, 1),
            ("sms / 02", 12, 12, 6),
            ("sms / 03", 12, 12, 2)
        ])
    );
    let by_user = rows(store, &shop, &[User, Channel], "").await;
    let u01 = &refs["u01"];
    assert!(
        by_user.contains(&(format!("{u01} / rcs"), 1, 1, 1)),
        "{by_user:?}"
    );
    assert!(
        by_user.contains(&(format!("{u01} / sms"), 1, 1, 1)),
        "{by_user:?}"
    );
    assert_eq!(by_user.len(), 16);
    // The operator sees carriers; another enterprise sees nothing of it.
    let operator = Viewer::Operator(None);
    assert_eq!(
        rows(store, &operator, &[Carrier], "").await,
        expect(&[("c1", 16, 16, 9)])
    );
    assert_eq!(
        rows(store, &Viewer::Enterprise("ent_other".into()), &[], "").await,
        expect(&[("", 0, 0, 0)])
    );

    // The rollups equal a recount from the events.
    let mut recount = (0, 0, 0);
    for message in ["m1", "m2"] {
        let counts = store.recount_message(message).await.unwrap();
        recount.0 += counts.handed_over;
        recount.1 += counts.delivered;
        recount.2 += counts.opened;
    }
    assert_eq!(recount, (16, 16, 9));
    fixture.close().await;
}

async fn reconciliation_flags_a_carrier_that_under_reports(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    dataset(store).await;
    let report = |message: &str, at, sent, opened| CountReport {
        at,
        counts: vec![MessageCount {
            message_id: message.into(),
            sent,
            opened,
            sms_segments: 0,
            unsupported: 0,
            expired: 0,
        }],
    };
    // m1: 12 delivered and 8 opened counted; the carrier claims 5 opens.
    store
        .store_count_report("c1", &report("m1", T0 + 5 * HOUR, 12, 5))
        .await
        .unwrap();
    let findings: Vec<(String, String)> = store
        .reconcile(None, false)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.message_id.clone(), stats::finding(row)))
        .collect();
    assert_eq!(
        findings,
        vec![
            (
                "m1".to_owned(),
                "carrier under-reports opens by 3".to_owned()
            ),
            (
                "m2".to_owned(),
                "the carrier has not reported on this message yet".to_owned()
            ),
        ]
    );
    // A corrected report agrees, and only shows when everything is asked for.
    store
        .store_count_report("c1", &report("m1", T0 + 6 * HOUR, 12, 8))
        .await
        .unwrap();
    assert!(store.reconcile(Some("m1"), false).await.unwrap().is_empty());
    let all = store.reconcile(Some("m1"), true).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(stats::finding(&all[0]), "agrees");
    assert_eq!((all[0].counted_delivered, all[0].counted_opened), (12, 8));
    fixture.close().await;
}

/// Place and hour targeting on the dataset plus a third campaign: at 00:xx UTC
/// people in tokyo open 14 of 24 (58%), osaka has too few deliveries to say.
async fn place_and_hour_targeting_picks_people_and_hours_above_the_threshold(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = dataset(store).await;
    let ref_of = |i: usize| refs[&format!("u{i:02}")].clone();
    let t3 = T0 + 2 * DAY + 10 * 60_000;
    send(
        store,
        "m3",
        Channel::Sms,
        (1..=12).map(ref_of).collect(),
        t3,
    )
    .await;
    let mut receipts: Vec<Receipt> = (1..=12)
        .map(|user| {
            let place = if user <= 10 { "tokyo" } else { "osaka" };
            receipt(
                "m3",
                user,
                EventKind::Delivered,
                Channel::Sms,
                t3 + 60_000,
                place,
            )
        })
        .collect();
    receipts.extend((1..=5).map(|user| {
        receipt(
            "m3",
            user,
            EventKind::Opened,
            Channel::Sms,
            t3 + HOUR,
            "tokyo",
        )
    }));
    store.record_receipts("c1", &receipts, t3).await.unwrap();
    fold_queued(store).await;

    let now = T0 + 3 * DAY + 12 * HOUR;
    let targeted = |key: &str, min_rate_permille| NewMessage {
        idempotency_key: key.into(),
        target: Target::Refs((1..=12).map(ref_of).collect()),
        content: Content {
            text: "tonight".into(),
            ..Content::default()
        },
        policy: Policy::fixed(Some(Channel::Sms)),
        all_carriers: false,
        timing: Timing {
            send_time: Some(SendTime::PlaceHour {
                min_rate_permille,
                within_ms: DAY,
            }),
            ..Timing::default()
        },
        follow_up: None,
        priority: Priority::Normal,
        bid_id: None,
        trace_parent: String::new(),
    };
    store
        .accept_message(
            "ent_1",
            "m4",
            &targeted("m4", 500),
            now,
            now + DAY,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    for user in 1..=12 {
        let trace = store.explain("m4", &format!("u{user:02}")).await.unwrap();
        let attempt = &trace.attempts[0];
        if user <= 10 {
            assert_eq!(attempt.state, "waiting", "u{user:02}: {attempt:?}");
            assert_eq!(
                attempt.not_before,
                T0 + 4 * DAY,
                "u{user:02}: 00:00 UTC tomorrow"
            );
            assert!(
                attempt.reason.contains("people at tokyo open 58.3%"),
                "{}",
                attempt.reason
            );
        } else {
            assert_eq!(attempt.state, "skipped", "u{user:02}: {attempt:?}");
            assert!(
                attempt
                    .reason
                    .contains("no hour ahead reaches 50.0% at osaka"),
                "{}",
                attempt.reason
            );
        }
    }
    assert_eq!(store.message_counts("m4").await.unwrap().skipped, 2);

    // Above tokyo's rate: nobody goes.
    store
        .accept_message(
            "ent_1",
            "m5",
            &targeted("m5", 700),
            now,
            now + DAY,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    assert_eq!(store.message_counts("m5").await.unwrap().skipped, 12);
    fixture.close().await;
}

/// End to end: `GetStats` and the CLI over a campaign the terminals saw.
async fn stats_show_what_the_terminals_saw(backend: Backend) {
    let Some(scene) = scene(
        backend,
        Setup {
            users: 10,
            settings: Settings {
                min_cohort: 1,
                ..Settings::default()
            },
            ..half_open()
        },
    )
    .await
    else {
        return;
    };
    let n = scene.fleet.users.len() as u64;
    let id = scene
        .send(
            0,
            pb::SendMessageRequest {
                channel: chukei_proto::common::v1::Channel::Sms as i32,
                ..everyone("stats", "weekly news")
            },
        )
        .await;
    scene.wait(0, &id, |s| s.delivered == n).await;
    scene.advance(61 * 60_000);
    scene.wait(0, &id, |s| s.opened == n / 2).await;

    scene.wait_for_stats(0, n, n / 2).await;
    let stats = scene
        .client(0)
        .get_stats(pb::GetStatsRequest {
            by: vec![pb::StatsDimension::Channel as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.columns, vec!["channel"]);
    assert_eq!(stats.rows.len(), 1);
    let row = &stats.rows[0];
    assert_eq!(row.key, vec!["sms"]);
    assert_eq!((row.sent, row.delivered, row.opened), (n, n, n / 2));
    let rate = row.open_rate.unwrap();
    assert!((rate.rate - 0.5).abs() < 1e-9);
    assert!(rate.low < 0.5 && rate.high > 0.5 && row.low_sample);

    // The per-ref breakdown names each person's open.
    let by_user = scene
        .client(0)
        .get_stats(pb::GetStatsRequest {
            by: vec![pb::StatsDimension::User as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for index in 0..n as usize {
        let reference = scene.ref_of(0, index);
        let row = by_user
            .rows
            .iter()
            .find(|r| r.key == vec![reference.clone()])
            .unwrap();
        let opened = scene
            .items(index, &id)
            .iter()
            .any(|i| i.opened_at.is_some());
        assert_eq!(row.opened, u64::from(opened), "user {index}");
    }

    // Enterprises never see carriers; bad dimensions name the field.
    let refused = scene
        .client(0)
        .get_stats(pb::GetStatsRequest {
            by: vec![pb::StatsDimension::Carrier as i32],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("by[0]: carrier"),
        "{}",
        refused.message()
    );
    let refused = scene
        .client(0)
        .get_stats(pb::GetStatsRequest {
            zone: "Nowhere/City".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().starts_with("zone:"),
        "{}",
        refused.message()
    );

    // The CLI prints the same figures as CSV.
    let cli = enterprise_cli::Cli {
        relay_url: scene.hub.relay_url(),
        tls_ca: None,
        api_key: Some(scene.enterprises[0].1.clone()),
        json: false,
        command: enterprise_cli::Command::Stats(enterprise_cli::cmd::stats::Stats {
            by: vec!["channel".into(), "hour".into()],
            since: "1d".into(),
            until: None,
            zone: "Asia/Tokyo".into(),
            csv: true,
        }),
    };
    let mut out = Vec::new();
    enterprise_cli::run(cli, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "channel,hour,sent,delivered,opened,open_rate,low,high,low_sample,suppressed"
    );
    assert!(
        lines[1].starts_with(&format!("sms,09,{n},{n},{},0.5000,", n / 2)),
        "{text}"
    );

    // The operator's reconciliation: the carrier's reports agree once sent.
    let admin = scene.hub.admin().await.unwrap();
    let reconciled = integration_tests::eventually("the carrier's report", WAIT, || {
        // Reports go on the carrier's clock: let some of it pass.
        scene.advance(2_000);
        let mut admin = admin.clone();
        let id = id.clone();
        async move {
            let rows = admin
                .reconcile(pb::ReconcileRequest {
                    message_id: id,
                    all: true,
                })
                .await
                .unwrap()
                .into_inner()
                .rows;
            rows.iter()
                .all(|r| r.finding == "agrees")
                .then_some(rows)
                .filter(|rows| !rows.is_empty())
        }
    })
    .await;
    assert_eq!(reconciled[0].counted_opened, n / 2);
    scene.hub.shutdown().await.unwrap();
}

backend_tests!(
    place_and_hour_targeting_picks_people_and_hours_above_the_threshold,
    every_breakdown_matches_a_hand_checked_dataset,
    reconciliation_flags_a_carrier_that_under_reports,
    stats_show_what_the_terminals_saw,
);
