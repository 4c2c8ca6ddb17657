//! The storage seam's conformance suite, run on SQLite and PostgreSQL alike:
//! receipts are deduplicated into events however often and in whatever order
//! they arrive, receipts only count for deliveries the relay made to that
//! carrier, and the latest count report wins.

use chukei_proto::window::Window;
use integration_tests::{Backend, backend_tests, store};
use relay_svc::policy::{AttentionConfig, Policy, PolicyKind, Priority, Timing, WindowMode};
use relay_svc::receipts::{CountReport, EventKind, MessageCount, Receipt};
use relay_svc::registry::{Contract, NewRegistration, Profile};
use relay_svc::storage::{DueDelivery, DueNowSink, Expansion, Lane, MessageCounts, Store};
use relay_svc::targeting::{Channel, Content, MessageState, NewMessage, Target};

fn receipt(message_id: &str, user_id: &str, kind: EventKind) -> Receipt {
    Receipt {
        delivery_id: None,
        message_id: message_id.into(),
        user_id: user_id.into(),
        kind,
        channel: None,
        at: 1_000,
        region: "tokyo".into(),
    }
}

/// A message "hi" to `refs` on a fixed channel, to every carrier of each
/// person or only their primary.
fn to_refs(refs: Vec<String>, all_carriers: bool) -> NewMessage {
    NewMessage {
        idempotency_key: "k".into(),
        target: Target::Refs(refs),
        content: Content {
            text: "hi".into(),
            ..Content::default()
        },
        policy: Policy::fixed(None),
        all_carriers,
        timing: Timing::default(),
        follow_up: None,
        priority: Priority::Normal,
        bid_id: None,
        trace_parent: String::new(),
    }
}

/// An active contract of `user`'s.
fn contract(user: &str, primary: bool) -> Contract {
    Contract {
        user_id: user.into(),
        primary,
        active: true,
    }
}

/// `user`'s contract ended (a carrier's upload saying so).
fn ended(user: &str) -> Contract {
    Contract {
        user_id: user.into(),
        primary: true,
        active: false,
    }
}

/// `users` registering with ent_1, nothing shared.
fn with_ent_1(users: &[&str]) -> Vec<NewRegistration> {
    users
        .iter()
        .map(|user| NewRegistration {
            user_id: (*user).into(),
            enterprise_id: "ent_1".into(),
            service_id: None,
            profile: Profile::default(),
            text_version: "v1".into(),
        })
        .collect()
}

/// One enterprise, carriers c1–c3; u1 on c1 (primary) and c2, u2 on c1;
/// both registered. Returns their refs (u1, u2).
async fn seed_registry(store: &Store) -> Vec<String> {
    store
        .create_enterprise("ent_1", "shop", "hash-1", 0)
        .await
        .unwrap();
    for carrier in ["c1", "c2", "c3"] {
        store
            .upsert_carrier(
                carrier,
                "http://127.0.0.1:1",
                &format!("token-{carrier}"),
                0,
            )
            .await
            .unwrap();
    }
    store
        .upsert_contracts("c1", &[contract("u1", true), contract("u2", true)], 0)
        .await
        .unwrap();
    store
        .upsert_contracts("c2", &[contract("u1", false)], 0)
        .await
        .unwrap();
    let registrations = with_ent_1(&["u1", "u2"]);
    let refs = store.register_users("c1", &registrations, 0).await.unwrap();
    // Registering again is idempotent: same refs.
    assert_eq!(
        store.register_users("c1", &registrations, 0).await.unwrap(),
        refs
    );

    refs
}

async fn receipts_count_once_whatever_arrives(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;

    let message = to_refs(refs.clone(), true);
    let stored = store
        .accept_message(
            "ent_1",
            "msg_1",
            &message,
            0,
            10_000,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    assert_eq!(stored.row.matched, Some(2));
    let c1 = store.due_deliveries("c1", 0, 0, 100).await.unwrap();
    let c2 = store.due_deliveries("c2", 0, 0, 100).await.unwrap();
    assert_eq!(
        (c1.len(), c2.len()),
        (2, 1),
        "u1 fans out over both carriers"
    );
    // Acked twice (a resent batch): still one hand-over per person.
    let c1_batch: Vec<i64> = c1.iter().map(|d| d.id).collect();
    store.mark_handed_over(&c1_batch, 5).await.unwrap();
    store.mark_handed_over(&c1_batch, 6).await.unwrap();
    store.mark_handed_over(&[c2[0].id], 7).await.unwrap();
    assert_eq!(store.pending_count("c1").await.unwrap(), 0);

    // Duplicates, both carriers reporting the same person, a read before its delivered.
    store
        .record_receipts(
            "c1",
            &[
                receipt("msg_1", "u1", EventKind::Opened),
                receipt("msg_1", "u1", EventKind::Delivered),
            ],
            0,
        )
        .await
        .unwrap();
    store
        .record_receipts(
            "c2",
            &[
                receipt("msg_1", "u1", EventKind::Delivered),
                receipt("msg_1", "u1", EventKind::Opened),
            ],
            0,
        )
        .await
        .unwrap();
    store
        .record_receipts("c1", &[receipt("msg_1", "u1", EventKind::Opened)], 0)
        .await
        .unwrap();
    // A carrier that never had the delivery, and a message that does not exist, count for nothing.
    store
        .record_receipts("c3", &[receipt("msg_1", "u2", EventKind::Opened)], 0)
        .await
        .unwrap();
    store
        .record_receipts("c1", &[receipt("msg_nope", "u2", EventKind::Opened)], 0)
        .await
        .unwrap();
    assert_eq!(
        store.message_counts("msg_1").await.unwrap(),
        MessageCounts {
            handed_over: 2,
            delivered: 1,
            opened: 1,
            failed: 0,
            ..MessageCounts::default()
        }
    );
    store
        .record_receipts("c1", &[receipt("msg_1", "u2", EventKind::Delivered)], 0)
        .await
        .unwrap();
    assert_eq!(
        store.message_counts("msg_1").await.unwrap(),
        MessageCounts {
            handed_over: 2,
            delivered: 2,
            opened: 1,
            failed: 0,
            ..MessageCounts::default()
        }
    );

    // The maintained counts equal a recount from the events.
    assert_eq!(
        store.recount_message("msg_1").await.unwrap(),
        store.message_counts("msg_1").await.unwrap()
    );

    // The latest count report wins; an older one arriving late does not overwrite it.
    let report = |at, sent| CountReport {
        at,
        counts: vec![MessageCount {
            message_id: "msg_1".into(),
            sent,
            opened: 1,
            sms_segments: 0,
            unsupported: 0,
            expired: 0,
        }],
    };
    store
        .store_count_report("c1", &report(20, 2))
        .await
        .unwrap();
    store
        .store_count_report("c1", &report(10, 1))
        .await
        .unwrap();
    let stats = store.carrier_counts(Some("msg_1")).await.unwrap();
    let c1 = stats.iter().find(|c| c.carrier_id == "c1").unwrap();
    assert_eq!((c1.reported_sent, c1.reported_opened), (2, 1));
    assert_eq!((c1.delivered, c1.opened), (2, 1));
    fixture.close().await;
}

fn message(key: &str, target: Target, window: Option<Window>) -> NewMessage {
    NewMessage {
        idempotency_key: key.into(),
        target,
        content: Content {
            text: "hi".into(),
            ..Content::default()
        },
        policy: Policy::fixed(None),
        all_carriers: false,
        timing: Timing {
            window,
            ..Timing::default()
        },
        follow_up: None,
        priority: Priority::Normal,
        bid_id: None,
        trace_parent: String::new(),
    }
}

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
/// 2026-11-26T00:00:00Z.
const DAY0: i64 = 1_795_651_200_000;

async fn held_deliveries_roll_to_the_next_opening_or_expire(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let attention = AttentionConfig::default();
    let daily = Window::daily(9 * 60, 10 * 60, "UTC").unwrap();
    let now = DAY0 + 9 * HOUR + 30 * MINUTE;
    store
        .accept_message(
            "ent_1",
            "msg_daily",
            &message("daily", Target::Refs(refs.clone()), Some(daily)),
            now,
            now + 72 * HOUR,
            &attention,
        )
        .await
        .unwrap();
    let due = |at| async move { store.due_deliveries("c1", 0, at, 100).await.unwrap().len() };
    assert_eq!(due(now + 15 * MINUTE).await, 2, "inside the window");
    // Not handed over before 10:00: the pending deliveries wait for tomorrow's opening.
    let done = store
        .follow_through(DAY0 + 10 * HOUR + 5 * MINUTE)
        .await
        .unwrap();
    assert_eq!(done.rolled, 1);
    assert_eq!(due(DAY0 + 10 * HOUR + 5 * MINUTE).await, 0);
    // Waiting rows are released when their time comes, not before.
    let released = store
        .follow_through(DAY0 + 33 * HOUR - 1)
        .await
        .unwrap()
        .released;
    assert_eq!((released, due(DAY0 + 33 * HOUR - 1).await), (0, 0));
    let released = store
        .follow_through(DAY0 + 33 * HOUR)
        .await
        .unwrap()
        .released;
    assert_eq!(
        (released, due(DAY0 + 33 * HOUR).await),
        (2, 2),
        "tomorrow at 09:00"
    );

    // An absolute window that ends before hand-over: expired, counted, never due.
    let once = Window::absolute(now, now + HOUR).unwrap();
    store
        .accept_message(
            "ent_1",
            "msg_once",
            &message("once", Target::Refs(refs.clone()), Some(once)),
            now,
            now + 72 * HOUR,
            &attention,
        )
        .await
        .unwrap();
    store.follow_through(now + 2 * HOUR).await.unwrap();
    let counts = store.message_counts("msg_once").await.unwrap();
    assert_eq!((counts.expired, counts.handed_over), (2, 0));
    assert_eq!(counts, store.recount_message("msg_once").await.unwrap());
    let pending = store
        .due_deliveries("c1", 0, now + 3 * HOUR, 100)
        .await
        .unwrap();
    assert!(pending.iter().all(|d| d.message_id != "msg_once"));
    fixture.close().await;
}

async fn a_targeted_message_defers_pending_campaign_deliveries(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let attention = AttentionConfig {
        quiet_period_ms: 30 * MINUTE,
        ..AttentionConfig::default()
    };
    // A campaign that opens at 00:20 is planned at 00:00.
    let t0 = DAY0;
    let later = Window::absolute(t0 + 20 * MINUTE, t0 + 5 * HOUR).unwrap();
    store
        .accept_message(
            "ent_1",
            "msg_campaign",
            &message("campaign", Target::AllRegistered, Some(later)),
            t0,
            t0 + 24 * HOUR,
            &attention,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .expand_message("msg_campaign", t0, &attention)
            .await
            .unwrap(),
        2
    );
    // At 00:10 a targeted message to u1: quiet until 00:40.
    store
        .accept_message(
            "ent_1",
            "msg_targeted",
            &message("targeted", Target::Refs(vec![refs[0].clone()]), None),
            t0 + 10 * MINUTE,
            t0 + 24 * HOUR,
            &attention,
        )
        .await
        .unwrap();
    let campaign_due = |at| async move {
        store
            .due_deliveries("c1", 0, at, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.message_id == "msg_campaign")
            .count()
    };
    assert_eq!(
        campaign_due(t0 + 20 * MINUTE).await,
        0,
        "waiting for the window"
    );
    store.follow_through(t0 + 30 * MINUTE).await.unwrap();
    assert_eq!(campaign_due(t0 + 30 * MINUTE).await, 1, "u2 only");
    store.follow_through(t0 + 40 * MINUTE).await.unwrap();
    assert_eq!(
        campaign_due(t0 + 40 * MINUTE).await,
        2,
        "u1 after the quiet period"
    );
    assert_eq!(
        store.message_counts("msg_campaign").await.unwrap().deferred,
        1
    );
    fixture.close().await;
}

async fn low_priority_is_skipped_first_and_high_priority_never(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    let attention = AttentionConfig {
        daily_cap: 2,
        ..AttentionConfig::default()
    };
    let mut outcomes = Vec::new();
    for (index, priority) in [
        Priority::Low,
        Priority::Low,
        Priority::Normal,
        Priority::High,
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("msg_{index}");
        let message = NewMessage {
            priority,
            ..message(&format!("k{index}"), Target::AllRegistered, None)
        };
        let now = DAY0 + index as i64 * MINUTE;
        store
            .accept_message("ent_1", &id, &message, now, now + HOUR, &attention)
            .await
            .unwrap();
        store.expand_message(&id, now, &attention).await.unwrap();
        let counts = store.message_counts(&id).await.unwrap();
        outcomes.push(counts.skipped);
        assert_eq!(counts, store.recount_message(&id).await.unwrap());
    }
    // Cap 2 a day; low priority gets half of it; high priority is exempt.
    assert_eq!(outcomes, [0, 2, 0, 0]);
    let trace = store.explain("msg_1", "u1").await.unwrap();
    assert_eq!(trace.attempts[0].state, "skipped");
    assert!(
        trace.attempts[0].reason.contains("low priority"),
        "{:?}",
        trace.attempts
    );
    fixture.close().await;
}

async fn a_rising_open_rate_restores_the_cap(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    let attention = AttentionConfig {
        daily_cap: 2,
        ..AttentionConfig::default()
    };
    let day = 24 * HOUR;
    // Two campaigns a day; returns who was skipped from each.
    let mut sent = 0;
    let mut campaign_day = |at: i64| {
        let ids = [format!("msg_{sent}"), format!("msg_{}", sent + 1)];
        sent += 2;
        async move {
            let mut skipped = Vec::new();
            for (index, id) in ids.iter().enumerate() {
                let now = at + index as i64 * HOUR;
                store
                    .accept_message(
                        "ent_1",
                        id,
                        &message(id, Target::AllRegistered, None),
                        now,
                        now + day,
                        &attention,
                    )
                    .await
                    .unwrap();
                store.expand_message(id, now, &attention).await.unwrap();
                let trace = store.explain(id, "u1").await.unwrap();
                skipped.push(trace.attempts.iter().all(|a| a.state == "skipped"));
            }
            (ids, skipped)
        }
    };
    // Nobody opens for five days: the second campaign of the day stops reaching u1.
    let mut last = Vec::new();
    for d in 0..5 {
        last = campaign_day(DAY0 + d * day).await.1;
    }
    assert_eq!(last, [false, true], "u1's cap fell to one a day");
    // u1 opens six of the campaigns that reached them.
    let opens: Vec<Receipt> = (0..8)
        .filter(|n| n % 2 == 0 || *n < 5)
        .map(|n| receipt(&format!("msg_{n}"), "u1", EventKind::Opened))
        .collect();
    store
        .record_receipts("c1", &opens, DAY0 + 5 * day)
        .await
        .unwrap();
    let (_, next) = campaign_day(DAY0 + 5 * day + HOUR).await;
    assert_eq!(next, [false, false], "opening again restores the full cap");
    fixture.close().await;
}

/// A read and its delivery reported in one batch: the delivery keeps its own
/// time (not the read's), whichever comes first in the batch — on PostgreSQL
/// the duplicate that wins would otherwise depend on the plan's join order.
async fn a_read_and_its_delivery_in_one_batch_keep_the_delivery_time(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let message = NewMessage {
        all_carriers: false,
        ..message("k", Target::Refs(refs), None)
    };
    store
        .accept_message(
            "ent_1",
            "msg_1",
            &message,
            0,
            100_000,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    let due = store.due_deliveries("c1", 0, 0, 100).await.unwrap();
    store
        .mark_handed_over(&due.iter().map(|d| d.id).collect::<Vec<_>>(), 5)
        .await
        .unwrap();
    let at = |kind, user: &str, at| Receipt {
        at,
        ..receipt("msg_1", user, kind)
    };
    // Many rows, so the planner may pick a hash join.
    let mut batch = Vec::new();
    for _ in 0..300 {
        batch.push(at(EventKind::Opened, "u1", 5_000));
        batch.push(at(EventKind::Delivered, "u1", 1_000));
        batch.push(at(EventKind::Delivered, "u2", 2_000));
        batch.push(at(EventKind::Opened, "u2", 6_000));
    }
    store.record_receipts("c1", &batch, 0).await.unwrap();
    for (user, delivered, opened) in [("u1", 1_000, 5_000), ("u2", 2_000, 6_000)] {
        let events = store.explain("msg_1", user).await.unwrap().events;
        let time = |kind| events.iter().find(|e| e.kind == kind).map(|e| e.at);
        assert_eq!(time(EventKind::Delivered), Some(delivered), "{user}");
        assert_eq!(time(EventKind::Opened), Some(opened), "{user}");
    }
    fixture.close().await;
}

/// Concurrent accepts share transactions and commits (`group.rs`) but keep
/// their own outcomes: a refusal in the middle of a group stores nothing of
/// its own and nothing less of the others', a call with another's
/// idempotency key in the same group answers with that message, and a call
/// abandoned half-way is all there or not at all.
async fn concurrent_accepts_keep_their_own_outcomes(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let attention = AttentionConfig::default();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let store = store.clone();
        // Every fifth names a person who is not registered; every seventh
        // repeats the key of the call before it (same message).
        let target = if i % 5 == 4 {
            Target::Refs(vec![refs[1].clone(), "r_nobody".into()])
        } else {
            Target::Refs(vec![refs[1].clone()])
        };
        let key = if i % 7 == 6 && (i - 1) % 5 != 4 {
            i - 1
        } else {
            i
        };
        let new = message(&format!("k{key}"), target, None);
        calls.spawn(async move {
            let stored = store
                .accept_message("ent_1", &format!("msg_{i}"), &new, 0, 10_000, &attention)
                .await;
            (i, key, stored)
        });
    }
    // Abandoned calls: dropped after 0 to 2.7 ms, wherever they are then.
    for i in 100..110 {
        let new = message(&format!("k{i}"), Target::Refs(vec![refs[1].clone()]), None);
        let _ = tokio::time::timeout(
            std::time::Duration::from_micros((i - 100) * 300),
            store.accept_message("ent_1", &format!("msg_{i}"), &new, 0, 10_000, &attention),
        )
        .await;
    }
    let mut accepted = std::collections::BTreeMap::new();
    while let Some(joined) = calls.join_next().await {
        let (i, key, stored) = joined.unwrap();
        match stored {
            Ok(stored) => {
                assert_ne!(i % 5, 4, "call {i} names an unregistered ref");
                assert_eq!(stored.row.matched, Some(1), "call {i}");
                let previous = accepted.insert(key, stored.row.message_id.clone());
                if let Some(previous) = previous {
                    assert_eq!(previous, stored.row.message_id, "one message per key {key}");
                }
            }
            Err(error) => {
                assert_eq!(i % 5, 4, "call {i} refused: {error}");
                // A refused call that repeats the key of a good one (a
                // different body) is refused for the key when that one was
                // stored first, else for its ref.
                let reasons: &[&str] = if key != i {
                    &[
                        "target.refs[1]: not registered with this enterprise",
                        "idempotency_key: already used for a different message",
                    ]
                } else {
                    &["target.refs[1]: not registered with this enterprise"]
                };
                assert!(
                    reasons.contains(&error.to_string().as_str()),
                    "call {i}: {error}"
                );
            }
        }
    }
    // The refused calls stored nothing; each accepted key is one message
    // with its delivery.
    let stored = integration_tests::sql_scalar(
        store,
        "SELECT COUNT(*) FROM messages WHERE enterprise_id = $1 AND idempotency_key NOT LIKE 'k1__'",
        "ent_1",
    )
    .await;
    assert_eq!(stored, accepted.len() as i64);
    for (key, message_id) in &accepted {
        let row = store.message("ent_1", message_id).await.unwrap();
        assert_eq!(row.map(|r| r.matched), Some(Some(1)), "key {key}");
    }
    // An abandoned call left its message whole or not at all.
    for i in 100..110 {
        let id = format!("msg_{i}");
        let messages = integration_tests::sql_scalar(
            store,
            "SELECT COUNT(*) FROM messages WHERE id = $1",
            &id,
        )
        .await;
        let deliveries = integration_tests::sql_scalar(
            store,
            "SELECT COUNT(*) FROM deliveries WHERE message_id = $1",
            &id,
        )
        .await;
        assert_eq!(messages, deliveries, "{id}");
    }
    // The store goes on accepting, and hands over one batch of many messages.
    let after = message("after", Target::Refs(vec![refs[1].clone()]), None);
    store
        .accept_message("ent_1", "msg_after", &after, 0, 10_000, &attention)
        .await
        .unwrap();
    let due = store.due_deliveries("c1", 0, 1, 1_000).await.unwrap();
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    store.mark_handed_over(&ids, 2).await.unwrap();
    for message_id in accepted.values().chain([&"msg_after".to_owned()]) {
        let counts = store.message_counts(message_id).await.unwrap();
        assert_eq!(counts.handed_over, 1, "{message_id}");
    }
    fixture.close().await;
}

/// Targeted messages accepted together (a batch, `accept_batch.rs`) are
/// each planned as if accepted alone: every carrier or the primary, one row
/// per channel, a ref named twice reached once, a window that opens later
/// held, the message stored expanded with its own count.
async fn concurrent_targeted_accepts_are_each_planned_as_alone(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let attention = AttentionConfig::default();
    let now = DAY0;
    let later = Window::absolute(now + HOUR, now + 2 * HOUR).unwrap();
    // (message, matched, rows, rows on c2, rows held, channels)
    let kind = |i: usize| -> (NewMessage, i64, i64, i64, i64, i64) {
        let (u1, u2) = (refs[0].clone(), refs[1].clone());
        match i % 4 {
            0 => {
                let mut new = to_refs(vec![u1.clone(), u2, u1], true);
                new.idempotency_key = format!("k{i}");
                (new, 2, 3, 1, 0, 1)
            }
            1 => {
                let mut new = message(&format!("k{i}"), Target::Refs(vec![u1, u2]), None);
                new.policy = Policy {
                    kind: PolicyKind::Multi,
                    channels: vec![Channel::Sms, Channel::Email],
                    ..Policy::fixed(None)
                };
                (new, 2, 4, 0, 0, 2)
            }
            2 => (
                message(
                    &format!("k{i}"),
                    Target::Refs(vec![u2]),
                    Some(later.clone()),
                ),
                1,
                1,
                0,
                1,
                1,
            ),
            _ => (
                message(&format!("k{i}"), Target::Refs(vec![u1]), None),
                1,
                1,
                0,
                0,
                1,
            ),
        }
    };
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..48 {
        let (store, (new, ..)) = (store.clone(), kind(i));
        calls.spawn(async move {
            store
                .accept_message(
                    "ent_1",
                    &format!("msg_{i}"),
                    &new,
                    now,
                    now + 3 * HOUR,
                    &attention,
                )
                .await
        });
    }
    while let Some(joined) = calls.join_next().await {
        joined.unwrap().unwrap();
    }
    let count = |sql: &'static str, id: String| async move {
        integration_tests::sql_scalar(store, sql, &id).await
    };
    for i in 0..48 {
        let (_, matched, rows, on_c2, held, channels) = kind(i);
        let id = format!("msg_{i}");
        let row = store.message("ent_1", &id).await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.matched),
            (MessageState::Expanded, Some(matched as u64)),
            "{id}"
        );
        let found = (
            count("SELECT COUNT(*) FROM deliveries WHERE message_id = $1", id.clone()).await,
            count("SELECT COUNT(*) FROM deliveries WHERE message_id = $1 AND carrier_id = 'c2'", id.clone()).await,
            count("SELECT COUNT(*) FROM deliveries WHERE message_id = $1 AND state = 6", id.clone()).await,
            count("SELECT COUNT(DISTINCT channel) FROM deliveries WHERE message_id = $1", id.clone()).await,
            count("SELECT COUNT(*) FROM deliveries WHERE message_id = $1 AND lane = 0 AND attempt = 0", id.clone()).await,
        );
        assert_eq!(found, (rows, on_c2, held, channels, rows), "{id}");
    }
    fixture.close().await;
}

/// A carrier's receipts that overtake its acknowledgement (it pushes while
/// it commits) add the handed-over events the mark of that acknowledgement
/// adds too, in another transaction at the same time: each person is
/// counted once, and neither fails. (Both insert in key order; on
/// PostgreSQL the bench's load made the two deadlock when one went in id
/// order and the other in the receipts' order. This race alone did not.)
async fn a_mark_and_receipts_racing_count_each_person_once(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    let users: Vec<String> = (0..500).map(|i| format!("p{i:03}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let contracts: Vec<Contract> = users.iter().map(|user| contract(user, true)).collect();
    store.upsert_contracts("c1", &contracts, 0).await.unwrap();
    let refs = store
        .register_users("c1", &with_ent_1(&users), 0)
        .await
        .unwrap();
    let attention = AttentionConfig::default();
    for round in 0..8 {
        let message_id = format!("msg_race_{round}");
        let mut new = to_refs(refs.clone(), false);
        new.idempotency_key = message_id.clone();
        store
            .accept_message("ent_1", &message_id, &new, 0, 10_000, &attention)
            .await
            .unwrap();
        let ids: Vec<i64> = store
            .due_deliveries("c1", 0, 0, 5_000)
            .await
            .unwrap()
            .iter()
            .filter(|d| d.message_id == message_id)
            .map(|d| d.id)
            .collect();
        assert_eq!(ids.len(), users.len());
        // The receipts in the opposite order to the deliveries' ids.
        let receipts: Vec<Receipt> = users
            .iter()
            .rev()
            .map(|user| receipt(&message_id, user, EventKind::Delivered))
            .collect();
        let (marked, recorded) = tokio::join!(
            store.mark_handed_over_in(Lane::Priority, &ids, 5),
            store.record_receipts("c1", &receipts, 6),
        );
        marked.unwrap();
        recorded.unwrap();
        let counts = store.message_counts(&message_id).await.unwrap();
        assert_eq!(
            (counts.handed_over, counts.delivered),
            (500, 500),
            "{message_id}"
        );
    }
    fixture.close().await;
}

/// A targeted message's refs are resolved inside its attempts' insert: a
/// registered person without a contract is matched by nobody and the
/// message accepted; an unregistered ref is named, and nothing is stored.
async fn refs_without_contracts_are_accepted_and_unknown_refs_named(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let attention = AttentionConfig::default();
    // u2 ends their only contract: still registered, no carrier to reach them by.
    store
        .upsert_contracts("c1", &[ended("u2")], 0)
        .await
        .unwrap();
    let both = message("both", Target::Refs(refs.clone()), None);
    let stored = store
        .accept_message("ent_1", "msg_both", &both, 0, 10_000, &attention)
        .await
        .unwrap();
    assert_eq!(stored.row.matched, Some(1));
    let alone = message("alone", Target::Refs(vec![refs[1].clone()]), None);
    let stored = store
        .accept_message("ent_1", "msg_alone", &alone, 0, 10_000, &attention)
        .await
        .unwrap();
    assert_eq!(stored.row.matched, Some(0));
    let unknown = message(
        "unknown",
        Target::Refs(vec![refs[0].clone(), refs[1].clone(), "r_nobody".into()]),
        None,
    );
    let refused = store
        .accept_message("ent_1", "msg_unknown", &unknown, 0, 10_000, &attention)
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "target.refs[2]: not registered with this enterprise"
    );
    assert!(
        store
            .message("ent_1", "msg_unknown")
            .await
            .unwrap()
            .is_none()
    );
    let attempts = integration_tests::sql_scalar(
        store,
        "SELECT COUNT(*) FROM deliveries WHERE message_id = $1",
        "msg_unknown",
    )
    .await;
    assert_eq!(attempts, 0);
}

/// Targeted accepts keep the refs they resolved in memory
/// (`storage/ref_cache.rs`): each change to the registries reaches the next
/// accept — a new primary carrier, contracts ended, the person gone —
/// whichever write path made it.
async fn every_registry_change_reaches_the_next_targeted_accept(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let u2 = refs[1].clone();
    let attention = AttentionConfig::default();
    let mut sent = 0;
    let mut send = |store: Store| {
        sent += 1;
        let (key, id) = (format!("k{sent}"), format!("msg_{sent}"));
        let new = message(&key, Target::Refs(vec![u2.clone()]), None);
        async move {
            let accepted = store
                .accept_message("ent_1", &id, &new, 0, 10_000, &attention)
                .await;
            let on_c1 = integration_tests::sql_scalar(
                &store,
                "SELECT COUNT(*) FROM deliveries WHERE message_id = $1 AND carrier_id = 'c1'",
                &id,
            )
            .await;
            let on_c3 = integration_tests::sql_scalar(
                &store,
                "SELECT COUNT(*) FROM deliveries WHERE message_id = $1 AND carrier_id = 'c3'",
                &id,
            )
            .await;
            accepted.map(|a| (a.row.matched, on_c1, on_c3))
        }
    };
    // Twice, the second from memory.
    assert_eq!(send(store.clone()).await.unwrap(), (Some(1), 1, 0));
    assert_eq!(send(store.clone()).await.unwrap(), (Some(1), 1, 0));
    // A carrier's upload makes c3 u2's primary.
    store
        .upsert_contracts("c3", &[contract("u2", true)], 0)
        .await
        .unwrap();
    assert_eq!(send(store.clone()).await.unwrap(), (Some(1), 0, 1));
    // Both contracts ended: registered, but no carrier reaches them.
    for carrier in ["c1", "c3"] {
        store
            .upsert_contracts(carrier, &[ended("u2")], 0)
            .await
            .unwrap();
    }
    assert_eq!(send(store.clone()).await.unwrap(), (Some(0), 0, 0));
    // Back with c1.
    store
        .upsert_contracts("c1", &[contract("u2", true)], 0)
        .await
        .unwrap();
    assert_eq!(send(store.clone()).await.unwrap(), (Some(1), 1, 0));
    // Gone from the enterprise (erased by their carrier): the ref is unknown.
    let leave = relay_svc::registry::Unregistration {
        user_id: "u2".into(),
        enterprise_id: Some("ent_1".into()),
        service_id: None,
    };
    let removed = store.unregister_users("c1", &[leave], 0).await.unwrap();
    assert_eq!(removed, 1);
    let refused = send(store.clone()).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        "target.refs[0]: not registered with this enterprise"
    );
    fixture.close().await;
}

/// A campaign expanded in steps (here two registrations a step) plans
/// everyone once: the message stays accepted with its matched count unknown
/// until the last step; each step plans only its own people, so fatigue
/// counts each person once (a step re-counting the people of the steps
/// before would spend their budget twice), and the counts agree with the
/// events.
async fn a_campaign_expanded_in_steps_plans_everyone_once(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    let people: Vec<String> = (3..=7).map(|n| format!("u{n}")).collect();
    integration_tests::contract_and_register(store, "c1", "ent_1", &people, 0)
        .await
        .unwrap();
    // Three campaign sends a day per person, hub-wide.
    let attention = AttentionConfig {
        daily_budget: 3,
        ..AttentionConfig::default()
    };
    let accept = |id: &'static str, all_carriers: bool| {
        let message = NewMessage {
            all_carriers,
            ..message(id, Target::AllRegistered, None)
        };
        async move {
            store
                .accept_message("ent_1", id, &message, DAY0, DAY0 + HOUR, &attention)
                .await
                .unwrap();
        }
    };
    let skipped = |id: &'static str| async move {
        let counts = store.message_counts(id).await.unwrap();
        assert_eq!(counts, store.recount_message(id).await.unwrap(), "{id}");
        counts.skipped
    };

    accept("msg_a", false).await;
    assert_eq!(
        store
            .expand_message("msg_a", DAY0, &attention)
            .await
            .unwrap(),
        7
    );
    // u1 is on c1 and c2: eight attempts for seven people.
    accept("msg_b", true).await;
    let campaign = store
        .campaign_to_expand("msg_b", DAY0)
        .await
        .unwrap()
        .expect("accepted, to be expanded");
    let mut steps = Vec::new();
    loop {
        let step = store
            .expand_step(&campaign, DAY0, &attention, 2)
            .await
            .unwrap();
        steps.push(step);
        let row = store.message("ent_1", "msg_b").await.unwrap().unwrap();
        match step {
            Expansion::Continues { .. } => {
                assert_eq!(row.state, MessageState::Accepted);
                assert_eq!(row.matched, None, "matched is known at the last step");
            }
            Expansion::Done { .. } => {
                assert_eq!(row.state, MessageState::Expanded);
                assert_eq!(row.matched, Some(7));
                break;
            }
            Expansion::NotHere => panic!("nobody else expands msg_b"),
        }
    }
    assert_eq!(
        steps,
        [
            Expansion::Continues { matched: 2 },
            Expansion::Continues { matched: 4 },
            Expansion::Continues { matched: 6 },
            Expansion::Done { matched: 7 },
        ]
    );
    // Another step finds it expanded and does nothing.
    assert_eq!(
        store
            .expand_step(&campaign, DAY0, &attention, 2)
            .await
            .unwrap(),
        Expansion::NotHere
    );
    let pending: Vec<(String, u64)> = store
        .carrier_counts(Some("msg_b"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.carrier_id, c.pending))
        .collect();
    assert_eq!(
        pending,
        [("c1".into(), 7), ("c2".into(), 1), ("c3".into(), 0)]
    );
    assert_eq!(skipped("msg_b").await, 0);
    // The third send reaches everyone; the fourth nobody.
    accept("msg_c", false).await;
    store
        .expand_message("msg_c", DAY0, &attention)
        .await
        .unwrap();
    assert_eq!(
        skipped("msg_c").await,
        0,
        "a step spent someone's budget twice"
    );
    accept("msg_d", false).await;
    store
        .expand_message("msg_d", DAY0, &attention)
        .await
        .unwrap();
    assert_eq!(skipped("msg_d").await, 7);
    fixture.close().await;
}

/// A receipt that arrives before its batch's acknowledgement was recorded
/// (the carrier stored and pushed, the relay crashed before the ack) still
/// adds the person's hand-over; the acknowledgement that follows adds no
/// second one, nor does a later receipt.
async fn a_receipt_before_its_acknowledgement_adds_the_hand_over_once(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let message = to_refs(vec![refs[1].clone()], false);
    store
        .accept_message(
            "ent_1",
            "msg_1",
            &message,
            0,
            10_000,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    let due = store.due_deliveries("c1", 0, 0, 100).await.unwrap();
    assert_eq!(due.len(), 1);
    let counts = |handed_over, delivered, opened| MessageCounts {
        handed_over,
        delivered,
        opened,
        ..MessageCounts::default()
    };
    store
        .record_receipts("c1", &[receipt("msg_1", "u2", EventKind::Delivered)], 0)
        .await
        .unwrap();
    assert_eq!(
        store.message_counts("msg_1").await.unwrap(),
        counts(1, 1, 0)
    );
    store.mark_handed_over(&[due[0].id], 5).await.unwrap();
    store
        .record_receipts("c1", &[receipt("msg_1", "u2", EventKind::Opened)], 6)
        .await
        .unwrap();
    assert_eq!(
        store.message_counts("msg_1").await.unwrap(),
        counts(1, 1, 1)
    );
    assert_eq!(
        store.recount_message("msg_1").await.unwrap(),
        store.message_counts("msg_1").await.unwrap()
    );
    fixture.close().await;
}

/// On PostgreSQL the expander gathers the statistics of `deliveries` again
/// once a campaign has planned more than twice the rows the planner believes
/// the table holds, and not before; SQLite plans without them.
async fn the_statistics_of_deliveries_follow_a_growing_campaign(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    let attention = AttentionConfig::default();
    store
        .accept_message(
            "ent_1",
            "msg_a",
            &message("msg_a", Target::AllRegistered, None),
            DAY0,
            DAY0 + HOUR,
            &attention,
        )
        .await
        .unwrap();
    let planned = store
        .expand_message("msg_a", DAY0, &attention)
        .await
        .unwrap();
    assert!(planned > 0);
    let postgres = backend == Backend::Postgres;
    // Never gathered: the planner knows nothing of the rows.
    let gather =
        |planned| async move { store.keep_statistics_of_deliveries(planned).await.unwrap() };
    assert_eq!(gather(planned).await, postgres);
    // Now it knows them, and twice as many.
    assert!(!gather(planned).await);
    assert!(!gather(planned * 2).await);
    assert_eq!(gather(planned * 2 + 1).await, postgres);
    fixture.close().await;
}

/// A lease renewal goes ahead of the writers waiting for SQLite's turn,
/// but bulk work goes on in whole transactions after it; a targeted
/// accept cuts it in slices for a while. Renewals counted as accepts kept
/// every campaign in eighths. PostgreSQL's writers take no turn: bulk
/// work is never sliced there.
async fn a_lease_renewal_leaves_bulk_work_whole(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let full = 2_000;
    assert_eq!(store.bulk_slice(full), full);
    assert!(
        store
            .hold_lease("control", "replica-a", DAY0, 10_000)
            .await
            .unwrap()
    );
    assert_eq!(store.bulk_slice(full), full, "a renewal slices nothing");
    store
        .accept_message(
            "ent_1",
            "msg_targeted",
            &message("targeted", Target::Refs(vec![refs[0].clone()]), None),
            DAY0,
            DAY0 + HOUR,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    let sliced = match backend {
        Backend::Sqlite => full / 8,
        Backend::Postgres => full,
    };
    assert_eq!(store.bulk_slice(full), sliced, "an accept slices bulk work");
    fixture.close().await;
}

/// How many transactions the write turn has seen from `writer`, from the
/// turn's hold-time histogram rendered by `registry`.
fn holds_by(registry: &chukei_proto::metrics::Registry, writer: &str) -> u64 {
    let prefix = format!("turn_seconds_bucket{{writer=\"{writer}\",le=\"+Inf\"}} ");
    registry
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str())?.trim().parse().ok())
        .unwrap_or(0)
}

/// A carrier's batch of a campaign's receipts that arrives while targeted
/// messages are being accepted is recorded a slice per transaction
/// (SQLite: an eighth of 1,000 receipts), so a targeted accept waits for
/// one slice, not for the whole batch; every receipt counts once all the
/// same, and the batch sent again counts nothing.
async fn receipts_among_targeted_accepts_are_recorded_in_slices(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let people: Vec<String> = (0..300).map(|n| format!("p{n:03}")).collect();
    integration_tests::contract_and_register(store, "c3", "ent_1", &people, 0)
        .await
        .unwrap();
    let attention = AttentionConfig::default();
    let campaign = message("campaign", Target::AllRegistered, None);
    store
        .accept_message("ent_1", "msg_all", &campaign, DAY0, DAY0 + HOUR, &attention)
        .await
        .unwrap();
    store
        .expand_message("msg_all", DAY0, &attention)
        .await
        .unwrap();
    let due = store.due_deliveries("c3", 0, DAY0, 1_000).await.unwrap();
    assert_eq!(due.len(), 300);
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    store.mark_handed_over(&ids, DAY0 + 1).await.unwrap();
    // A targeted message: bulk work is sliced from now on (SQLite).
    let targeted = message("targeted", Target::Refs(vec![refs[0].clone()]), None);
    store
        .accept_message("ent_1", "msg_t", &targeted, DAY0, DAY0 + HOUR, &attention)
        .await
        .unwrap();
    let registry = chukei_proto::metrics::Registry::new();
    store.time_write_turns(registry.histogram("turn_seconds", "held", &[10.0]));
    let receipts: Vec<Receipt> = people
        .iter()
        .map(|person| Receipt {
            at: DAY0 + 2,
            ..receipt("msg_all", person, EventKind::Delivered)
        })
        .collect();
    store
        .record_receipts("c3", &receipts, DAY0 + 2)
        .await
        .unwrap();
    let transactions = match backend {
        // 300 receipts in slices of 125.
        Backend::Sqlite => 3,
        // PostgreSQL's writers take no turn, and slice nothing.
        Backend::Postgres => 0,
    };
    assert_eq!(holds_by(&registry, "deliveries"), transactions);
    let counts = store.message_counts("msg_all").await.unwrap();
    assert_eq!(counts.delivered, 300);
    store
        .record_receipts("c3", &receipts, DAY0 + 3)
        .await
        .unwrap();
    let again = store.message_counts("msg_all").await.unwrap();
    assert_eq!(again, counts, "the batch sent again counts nothing");
    assert_eq!(again, store.recount_message("msg_all").await.unwrap());
    fixture.close().await;
}

/// The writer never checkpoints SQLite's WAL itself (a checkpoint in its
/// `COMMIT` held the write turn for the I/O); the store's checkpoint,
/// which a worker runs beside it, does. PostgreSQL checkpoints itself.
async fn the_wal_is_checkpointed_beside_the_writer_not_by_it(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    seed_registry(store).await;
    // Past 1,000 pages of WAL, where SQLite's own threshold would have
    // checkpointed it at the commit, and the next write restarted it.
    let people: Vec<String> = (0..20_000).map(|n| format!("person-{n:06}")).collect();
    integration_tests::contract_and_register(store, "c3", "ent_1", &people, 0)
        .await
        .unwrap();
    integration_tests::contract_and_register(store, "c3", "ent_1", &["late".to_owned()], 0)
        .await
        .unwrap();
    match (backend, store.checkpoint_wal().await.unwrap()) {
        (Backend::Sqlite, Some((frames, checkpointed))) => {
            assert!(
                frames > 1_000,
                "the WAL was checkpointed at a commit: {frames} frames"
            );
            assert_eq!(checkpointed, frames, "all of it checkpointed now");
        }
        (Backend::Postgres, None) => {}
        (backend, outcome) => panic!("{backend:?}: {outcome:?}"),
    }
    fixture.close().await;
}

/// What the store hands to the dispatchers, kept.
#[derive(Default)]
struct Handed(std::sync::Mutex<Vec<(String, DueDelivery)>>);

impl DueNowSink for Handed {
    fn due_now(&self, carrier_id: &str, deliveries: Vec<DueDelivery>) {
        let mut handed = self.0.lock().unwrap();
        handed.extend(deliveries.into_iter().map(|d| (carrier_id.to_owned(), d)));
    }
}

impl Handed {
    fn take(&self, carrier_id: &str) -> Vec<DueDelivery> {
        let mut handed = self.0.lock().unwrap();
        let (of, rest) = std::mem::take(&mut *handed)
            .into_iter()
            .partition(|(carrier, _)| carrier == carrier_id);
        *handed = rest;
        // In id order, as the stream sends them.
        let mut of: Vec<DueDelivery> = of.into_iter().map(|(_, delivery)| delivery).collect();
        of.sort_unstable_by_key(|d| d.id);
        of
    }
}

async fn a_batched_accept_hands_over_what_a_due_read_returns(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed_registry(store).await;
    let handed = std::sync::Arc::new(Handed::default());
    store.hand_due_now_to(handed.clone());
    // Every column a due read returns, a window held at the carrier included.
    let mut everything = message("everything", Target::Refs(refs.clone()), None);
    everything.content = Content {
        text: "your parcel".into(),
        media_url: "https://example.com/p.png".into(),
        subject: "Parcel".into(),
        suggested_replies: vec!["Track".into(), "Later".into()],
    };
    everything.timing.window = Some(Window::absolute(DAY0 + HOUR, DAY0 + 2 * HOUR).unwrap());
    everything.timing.mode = WindowMode::AtCarrier;
    everything.trace_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
    let stored = store
        .accept_message(
            "ent_1",
            "msg_everything",
            &everything,
            DAY0,
            DAY0 + 3 * HOUR,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    assert!(stored.dispatched, "nothing to wake for it");
    for carrier in ["c1", "c2"] {
        let read = store
            .due_in_lane(carrier, Lane::Priority, 0..i64::MAX, DAY0, 100)
            .await
            .unwrap();
        assert_eq!(handed.take(carrier), read, "{carrier}: handed over as read");
    }
    assert_eq!(
        store
            .due_in_lane("c1", Lane::Priority, 0..i64::MAX, DAY0, 100)
            .await
            .unwrap()
            .len(),
        2,
        "u1 and u2 on their primary carrier"
    );
    // Held at the relay until its window opens: nothing due, nothing handed.
    let later = message(
        "later",
        Target::Refs(refs),
        Some(Window::absolute(DAY0 + HOUR, DAY0 + 2 * HOUR).unwrap()),
    );
    let stored = store
        .accept_message(
            "ent_1",
            "msg_later",
            &later,
            DAY0,
            DAY0 + 3 * HOUR,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
    assert!(stored.dispatched);
    assert!(handed.take("c1").is_empty(), "waiting for its window");
    fixture.close().await;
}

backend_tests!(
    every_registry_change_reaches_the_next_targeted_accept,
    the_wal_is_checkpointed_beside_the_writer_not_by_it,
    receipts_among_targeted_accepts_are_recorded_in_slices,
    a_batched_accept_hands_over_what_a_due_read_returns,
    a_lease_renewal_leaves_bulk_work_whole,
    the_statistics_of_deliveries_follow_a_growing_campaign,
    a_campaign_expanded_in_steps_plans_everyone_once,
    concurrent_accepts_keep_their_own_outcomes,
    concurrent_targeted_accepts_are_each_planned_as_alone,
    a_mark_and_receipts_racing_count_each_person_once,
    refs_without_contracts_are_accepted_and_unknown_refs_named,
    a_read_and_its_delivery_in_one_batch_keep_the_delivery_time,
    a_rising_open_rate_restores_the_cap,
    low_priority_is_skipped_first_and_high_priority_never,
    receipts_count_once_whatever_arrives,
    a_receipt_before_its_acknowledgement_adds_the_hand_over_once,
    held_deliveries_roll_to_the_next_opening_or_expire,
    a_targeted_message_defers_pending_campaign_deliveries,
);
