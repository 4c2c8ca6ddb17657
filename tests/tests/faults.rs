//! Nothing accepted is lost and nothing is counted twice when carriers,
//! terminals or the relay go away mid-campaign.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::{
    Backend, Enterprise, Hub, Settings, Tuning, backend_tests, eventually, listed_refs,
    registered_users, send_request, sql_scalar,
};

fn broadcast(key: &str, text: &str) -> pb::SendMessageRequest {
    send_request(
        key,
        pb::target::Kind::AllRegistered(true),
        text,
        common::Channel::Sms,
    )
}
use terminal_sim::fleet::{Fleet, SimUser};
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::{OpenMode, Terminals};

/// Every recipient has the message exactly once in their inbox.
fn assert_exactly_once(
    terminals: &Terminals,
    message_id: &str,
    expected: &HashMap<String, SimUser>,
) {
    let reached = terminals.recipients(message_id);
    assert_eq!(reached.len(), expected.len());
    for user_id in expected.keys() {
        let copies = terminals
            .inbox(user_id)
            .iter()
            .filter(|i| i.message_id == message_id)
            .count();
        assert_eq!(copies, 1, "{user_id} has {copies} copies of {message_id}");
    }
}

/// A hub with `carriers`, one enterprise, and a fleet of `users` all of whom may
/// register with it; returns the hub, the API key, the terminals and who registered.
async fn campaign_hub(
    backend: Backend,
    carriers: &[&str],
    seed: u64,
    users: usize,
) -> Option<(Hub, String, Terminals, HashMap<String, SimUser>)> {
    campaign_hub_with(backend, carriers, seed, users, Settings::default()).await
}

/// [`campaign_hub`] with `settings`.
async fn campaign_hub_with(
    backend: Backend,
    carriers: &[&str],
    seed: u64,
    users: usize,
    settings: Settings,
) -> Option<(Hub, String, Terminals, HashMap<String, SimUser>)> {
    let mut hub = Hub::start_settings(backend, carriers, settings)
        .await
        .unwrap()?;
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(
        seed,
        users,
        &carriers.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>(),
    )
    .with_every_channel();
    let choice = vec![EnterpriseChoice::enterprise(&shop)];
    let terminals = hub
        .start_fleet(fleet.clone(), choice, OpenMode::Always)
        .await
        .unwrap();
    let registered = registered_users(&fleet, &shop);
    Some((hub, key, terminals, registered))
}

async fn a_carrier_killed_mid_campaign_loses_nothing(backend: Backend) {
    let Some((mut hub, key, terminals, registered)) =
        campaign_hub(backend, &["alpha", "beta"], 21, 400).await
    else {
        return;
    };
    let mut client = hub.enterprise(&key).await.unwrap();

    // Kill alpha while the first campaign is flowing.
    let first = client
        .send_message(broadcast("first", "one"))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &first.message_id, |s| s.handed_over > 0)
        .await;
    hub.kill_carrier("alpha").await;
    // A second campaign is accepted while alpha is down; alpha's share must wait.
    let second = client
        .send_message(broadcast("second", "two"))
        .await
        .unwrap()
        .into_inner();
    let alpha_users = registered
        .values()
        .filter(|u| u.carriers[0] == "alpha")
        .count() as u64;
    let waiting = eventually(
        "alpha's deliveries to wait at the relay",
        Duration::from_secs(30),
        || async {
            let stats = hub.carrier_stats(&second.message_id).await.ok()?;
            let alpha = stats.into_iter().find(|c| c.carrier_id == "alpha")?;
            (alpha.pending == alpha_users && !alpha.connected).then_some(alpha.pending)
        },
    )
    .await;
    assert!(waiting > 0);

    hub.restart_carrier("alpha").await.unwrap();
    for message in [&first, &second] {
        let status = hub
            .wait_for_message(&key, &message.message_id, |s| {
                s.matched > 0 && s.opened == s.matched
            })
            .await;
        assert_eq!(status.matched as usize, registered.len());
        assert_eq!(status.delivered, status.matched);
        assert_exactly_once(&terminals, &message.message_id, &registered);
    }
    // The carriers' own reports agree with the relay's events once they come in.
    eventually(
        "count reports to match events",
        Duration::from_secs(30),
        || async {
            let stats = hub.carrier_stats(&second.message_id).await.ok()?;
            stats
                .iter()
                .all(|c| c.reported_sent == c.delivered && c.reported_opened == c.opened)
                .then_some(())
        },
    )
    .await;
    hub.shutdown().await.unwrap();
}

async fn a_relay_killed_with_pending_deliveries_loses_nothing(backend: Backend) {
    let Some((mut hub, key, terminals, registered)) =
        campaign_hub(backend, &["alpha", "beta"], 22, 300).await
    else {
        return;
    };
    hub.kill_carrier("beta").await;
    let mut client = hub.enterprise(&key).await.unwrap();
    let sent = client
        .send_message(broadcast("pending", "wait for it"))
        .await
        .unwrap()
        .into_inner();
    let beta_users = registered
        .values()
        .filter(|u| u.carriers[0] == "beta")
        .count() as u64;
    eventually(
        "beta's share to be pending",
        Duration::from_secs(30),
        || async {
            let stats = hub.carrier_stats(&sent.message_id).await.ok()?;
            stats
                .iter()
                .any(|c| c.carrier_id == "beta" && c.pending == beta_users)
                .then_some(())
        },
    )
    .await;

    hub.kill_and_restart_relay().await.unwrap();
    hub.restart_carrier("beta").await.unwrap();
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.matched > 0 && s.opened == s.matched
        })
        .await;
    assert_eq!(status.matched as usize, registered.len());
    assert_eq!(status.handed_over, status.matched);
    assert_exactly_once(&terminals, &sent.message_id, &registered);
    // The idempotency key still resolves to the same message after the crash.
    let again = client
        .send_message(broadcast("pending", "wait for it"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.message_id, sent.message_id);
    hub.shutdown().await.unwrap();
}

/// Accepted means committed, under load: targeted messages from many
/// callers at once (accepted together, in groups and batches). Each answer
/// comes after its commit — another connection to the database finds the
/// message the moment its answer is in — and with the relay killed at the
/// 150th answer, every message answered is there after the restart (the
/// same message for the same key) and reaches its person once. The calls
/// the kill cut off may or may not have been stored; a retry with their
/// key settles which.
async fn every_answered_message_survives_a_relay_killed_mid_stream(backend: Backend) {
    const CALLERS: usize = 64;
    const KILL_AFTER: usize = 150;
    let Some((mut hub, key, terminals, _)) = campaign_hub(backend, &["alpha"], 24, 60).await else {
        return;
    };
    let mut client = hub.enterprise(&key).await.unwrap();
    let refs = listed_refs(&mut client, 1000).await.unwrap();
    assert!(!refs.is_empty());
    let answered = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let killed = Arc::new(AtomicBool::new(false));
    // Another connection to the relay's database: what it reads is committed.
    let other = Arc::new(
        relay_svc::storage::Store::connect(hub.database_url())
            .await
            .unwrap(),
    );
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let (mut client, refs, answered, enough, killed, other) = (
            client.clone(),
            refs.clone(),
            answered.clone(),
            enough.clone(),
            killed.clone(),
            other.clone(),
        );
        callers.spawn(async move {
            let mut kept = Vec::new();
            // Until the kill: the channel would reach the restarted relay.
            for i in 0.. {
                if killed.load(Ordering::SeqCst) {
                    break;
                }
                let request = send_request(
                    &format!("crash-{caller}-{i}"),
                    pb::target::Kind::Refs(pb::RefList {
                        refs: vec![refs[(caller * 7 + i) % refs.len()].clone()],
                    }),
                    "your code is 1234",
                    common::Channel::Sms,
                );
                let Ok(response) = client.send_message(request.clone()).await else {
                    break;
                };
                let message_id = response.into_inner().message_id;
                // Answered, so committed: another connection sees it now.
                let stored = sql_scalar(
                    &other,
                    "SELECT COUNT(*) FROM messages WHERE id = $1",
                    &message_id,
                )
                .await;
                assert_eq!(stored, 1, "{message_id} was answered before its commit");
                kept.push((request, message_id));
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    enough.notify_one();
                }
            }
            kept
        });
    }
    // A caller that failed an assertion ends before the count is reached.
    let _ = tokio::time::timeout(Duration::from_secs(60), enough.notified()).await;
    killed.store(true, Ordering::SeqCst);
    hub.kill_and_restart_relay().await.unwrap();
    let mut kept = Vec::new();
    while let Some(joined) = callers.join_next().await {
        kept.extend(joined.unwrap());
    }
    assert!(kept.len() >= KILL_AFTER, "{} answered", kept.len());

    let mut client = hub.enterprise(&key).await.unwrap();
    for (request, message_id) in &kept {
        let again = client
            .send_message(request.clone())
            .await
            .unwrap_or_else(|status| panic!("{message_id} after the restart: {status}"))
            .into_inner();
        assert_eq!(
            &again.message_id, message_id,
            "an answered message was lost: its key made a new one"
        );
    }
    eventually(
        "every answered message to reach its person",
        Duration::from_secs(60),
        || async {
            kept.iter()
                .all(|(_, id)| !terminals.recipients(id).is_empty())
                .then_some(())
        },
    )
    .await;
    for (_, message_id) in &kept {
        let reached = terminals.recipients(message_id);
        assert_eq!(reached.len(), 1, "{message_id} reached {reached:?}");
    }
    hub.shutdown().await.unwrap();
}

async fn deliveries_wait_for_terminals_to_attach(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(23, 50, &["alpha".into()]).with_every_channel();
    let choice = vec![EnterpriseChoice::enterprise(&shop)];
    hub.start_fleet(fleet.clone(), choice.clone(), OpenMode::Always)
        .await
        .unwrap();
    hub.stop_fleet().await.unwrap();
    let registered = registered_users(&fleet, &shop);
    let mut client = hub.enterprise(&key).await.unwrap();
    let sent = client
        .send_message(broadcast("held", "later"))
        .await
        .unwrap()
        .into_inner();
    // Handed to the carrier, which holds it: nobody is attached.
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.matched > 0 && s.handed_over == s.matched
        })
        .await;
    assert_eq!(status.delivered, 0);

    let terminals = hub
        .start_fleet(fleet.clone(), choice, OpenMode::Always)
        .await
        .unwrap();
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| s.opened == s.matched)
        .await;
    assert_eq!(status.delivered as usize, registered.len());
    assert_exactly_once(&terminals, &sent.message_id, &registered);
    hub.shutdown().await.unwrap();
}

/// Two relay replicas on one database: each carrier's stream is held by
/// exactly one of them (a lease), either serves enterprises, and when the one
/// holding the carriers dies mid-campaign the other takes them over once the
/// lease expires — nothing lost, nothing delivered or counted twice.
async fn two_relays_share_the_work_and_one_takes_over(backend: Backend) {
    let settings = Settings {
        lease_ttl_secs: 2,
        ..Settings::default()
    };
    let Some((mut hub, key, terminals, registered)) =
        campaign_hub_with(backend, &["alpha", "beta"], 24, 300, settings).await
    else {
        return;
    };
    let replica = hub.start_replica().await.unwrap();

    // Each carrier's stream is open from exactly one replica.
    let urls = [hub.relay_url(), replica.clone()];
    eventually(
        "each carrier held by one replica",
        Duration::from_secs(30),
        || async {
            let mut holders: HashMap<String, usize> = HashMap::new();
            for url in &urls {
                let mut admin = Hub::admin_at(url).await.ok()?;
                let stats = admin
                    .get_carrier_stats(pb::GetCarrierStatsRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                for carrier in stats.carriers.into_iter().filter(|c| c.connected) {
                    *holders.entry(carrier.carrier_id).or_default() += 1;
                }
            }
            (holders.len() == 2 && holders.values().all(|n| *n == 1)).then_some(())
        },
    )
    .await;

    // A campaign sent through the replica; the first relay dies at once.
    let mut client = Hub::enterprise_at(&replica, &key).await.unwrap();
    let sent = client
        .send_message(broadcast("takeover", "still arrives"))
        .await
        .unwrap()
        .into_inner();
    hub.kill_relay().await;
    let status = Hub::wait_for_message_at(&replica, &key, &sent.message_id, |s| {
        s.matched > 0 && s.opened == s.matched
    })
    .await;
    assert_eq!(status.matched as usize, registered.len());
    assert_eq!(status.handed_over, status.matched);
    assert_eq!(status.delivered, status.matched);
    assert_exactly_once(&terminals, &sent.message_id, &registered);
    // The survivor holds both carriers' streams now.
    let stats = Hub::admin_at(&replica)
        .await
        .unwrap()
        .get_carrier_stats(pb::GetCarrierStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.carriers.iter().all(|c| c.connected) && stats.carriers.len() == 2,
        "{stats:?}"
    );
    // The statistics the replica folds count every delivery once.
    let n = status.matched;
    eventually(
        "statistics folded once",
        Duration::from_secs(30),
        || async {
            let mut client = Hub::enterprise_at(&replica, &key).await.ok()?;
            let stats = client
                .get_stats(pb::GetStatsRequest::default())
                .await
                .ok()?
                .into_inner();
            let row = stats.rows.first()?;
            (row.delivered == n && row.opened == n).then_some(())
        },
    )
    .await;
    hub.shutdown().await.unwrap();
}

/// A slow carrier (paced) takes batches only as fast as it can: the backlog
/// waits at the relay, which shows it and how long it should take, and
/// everything still arrives once.
/// A carrier that takes 40 deliveries a second, fed in batches of 10, two
/// in flight: a backlog of more than a few dozen waits at the relay.
fn paced() -> Settings {
    Settings {
        tuning: Tuning {
            batch_size: 10,
            batches_in_flight: 2,
            poll_interval_ms: 100,
        },
        carrier_pace_per_sec: 40,
        ..Settings::default()
    }
}

async fn a_slow_carrier_leaves_a_visible_backlog_at_the_relay(backend: Backend) {
    let settings = paced();
    let Some((hub, key, terminals, registered)) =
        campaign_hub_with(backend, &["alpha"], 25, 150, settings).await
    else {
        return;
    };
    let sent = hub
        .enterprise(&key)
        .await
        .unwrap()
        .send_message(broadcast("paced", "slowly"))
        .await
        .unwrap()
        .into_inner();
    let waiting = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.backlog > 20 && s.expected_drain.is_some()
        })
        .await;
    assert!(waiting.backlog <= waiting.matched);
    let drain = waiting.expected_drain.unwrap();
    assert!(drain.seconds > 0 || drain.nanos > 0, "{drain:?}");
    let stats = hub.carrier_stats(&sent.message_id).await.unwrap();
    assert!(
        stats[0].pending > 0,
        "the backlog waits at the relay: {stats:?}"
    );
    let done = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.matched > 0 && s.opened == s.matched
        })
        .await;
    assert_eq!((done.backlog, done.expected_drain), (0, None));
    assert_exactly_once(&terminals, &sent.message_id, &registered);
    hub.shutdown().await.unwrap();
}

/// Sends a broadcast to everyone (through `paced()`'s slow carrier) and
/// returns its id once more than `started` deliveries are handed over.
async fn campaign_under_way(hub: &Hub, key: &str, client: &mut Enterprise, started: u64) -> String {
    let campaign = client
        .send_message(broadcast("backlog", "for everyone"))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(key, &campaign.message_id, |s| {
        s.matched > 100 && s.handed_over > started
    })
    .await;
    campaign.message_id
}

/// A message's status now.
async fn status(client: &mut Enterprise, message_id: &str) -> pb::MessageStatus {
    client
        .get_message(pb::GetMessageRequest {
            message_id: message_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A targeted message does not wait behind a campaign's backlog: a slow
/// carrier (40 deliveries a second) has a broadcast of 150 to work through,
/// and a message to one person sent just after it is delivered while most
/// of the broadcast is still waiting at the relay. Without the priority
/// lane it would come after all of it.
async fn a_targeted_message_overtakes_a_campaign_backlog(backend: Backend) {
    let settings = paced();
    let Some((hub, key, terminals, _)) =
        campaign_hub_with(backend, &["alpha"], 26, 150, settings).await
    else {
        return;
    };
    let mut client = hub.enterprise(&key).await.unwrap();
    let someone = client
        .list_registrations(pb::ListRegistrationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .registrations
        .pop()
        .unwrap()
        .user_ref;
    let campaign = campaign_under_way(&hub, &key, &mut client, 0).await;
    let targeted = client
        .send_message(integration_tests::send_request(
            "urgent",
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![someone],
            }),
            "your train leaves from platform 4",
            chukei_proto::common::v1::Channel::Sms,
        ))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &targeted.message_id, |s| s.delivered == 1)
        .await;
    let behind = status(&mut client, &campaign).await;
    assert!(
        behind.backlog > 60,
        "the targeted message waited for the campaign: {behind:?}"
    );
    assert_eq!(terminals.recipients(&targeted.message_id).len(), 1);
    hub.shutdown().await.unwrap();
}

/// A campaign's deliveries released from waiting while another campaign
/// flows go out at the next poll: they lie below the dispatcher's cursor,
/// which before the catch-up read only started over once the lane was idle.
async fn deliveries_released_below_the_cursor_go_while_the_lane_is_busy(backend: Backend) {
    let settings = paced();
    let Some((hub, key, _terminals, _)) =
        campaign_hub_with(backend, &["alpha"], 27, 150, settings).await
    else {
        return;
    };
    let mut client = hub.enterprise(&key).await.unwrap();
    // Held at the relay for a window a day away: its rows wait (lowest ids).
    let tomorrow = chukei_proto::clock::Clock::system().now_ms() + 86_400_000;
    let held = client
        .send_message(pb::SendMessageRequest {
            window: Some(common::DeliveryWindow {
                kind: Some(common::delivery_window::Kind::Absolute(
                    common::AbsoluteWindow {
                        start: Some(chukei_proto::clock::to_timestamp(tomorrow)),
                        end: Some(chukei_proto::clock::to_timestamp(tomorrow + 3_600_000)),
                    },
                )),
            }),
            window_mode: pb::WindowMode::HeldAtRelay as i32,
            ..broadcast("held", "tomorrow's news")
        })
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &held.message_id, |s| s.matched > 100)
        .await;
    let campaign = campaign_under_way(&hub, &key, &mut client, 20).await;
    // What the follow-through does when a window opens, early.
    let store = relay_svc::storage::Store::connect(hub.database_url())
        .await
        .unwrap();
    let released = integration_tests::sql_execute(
        &store,
        &format!(
            "UPDATE deliveries SET state = 0, not_before = 0, window_close = NULL WHERE message_id = '{}'",
            held.message_id
        ),
    )
    .await
    .unwrap();
    assert!(released > 100);
    hub.wait_for_message(&key, &held.message_id, |s| s.handed_over > 0)
        .await;
    let behind = status(&mut client, &campaign).await;
    assert!(
        behind.backlog > 30,
        "the released deliveries waited for the campaign: {behind:?}"
    );
    store.close().await;
    hub.shutdown().await.unwrap();
}

/// A hub on a manual clock whose fleet registered and then went away, so a
/// broadcast is handed to the carrier and held there; with the
/// reconciliation's `reoffer_after_secs` and `max_reoffers`.
async fn held_broadcast(
    backend: Backend,
    reoffer_after_secs: u64,
    max_reoffers: u32,
) -> Option<(
    Hub,
    Clock,
    String,
    pb::MessageStatus,
    Fleet,
    Vec<EnterpriseChoice>,
)> {
    let clock = Clock::manual(1_800_000_000_000);
    let settings = Settings {
        clock: Some(clock.clone()),
        reoffer_after_secs,
        max_reoffers,
        message_ttl_secs: 6 * 3600,
        ..Settings::default()
    };
    let mut hub = Hub::start_settings(backend, &["alpha"], settings)
        .await
        .unwrap()?;
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(29, 40, &["alpha".into()]).with_every_channel();
    let choice = vec![EnterpriseChoice {
        enterprise_id: shop,
        service_ids: vec![],
    }];
    hub.start_fleet(fleet.clone(), choice.clone(), OpenMode::Always)
        .await
        .unwrap();
    hub.stop_fleet().await.unwrap();
    let mut client = hub.enterprise(&key).await.unwrap();
    let sent = client
        .send_message(broadcast("held", "later"))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.matched > 0 && s.handed_over == s.matched
        })
        .await;
    assert_eq!(status.delivered, 0);
    Some((hub, clock, key, status, fleet, choice))
}

/// A carrier that loses what it acknowledged (its database gone) gets the
/// unconfirmed deliveries again from the reconciliation, once each, and the
/// decision trace says so.
async fn deliveries_a_carrier_lost_are_offered_again(backend: Backend) {
    let Some((mut hub, clock, key, status, fleet, choice)) = held_broadcast(backend, 600, 3).await
    else {
        return;
    };
    hub.kill_carrier("alpha").await;
    let data = hub.carriers[0].data_dir.clone();
    std::fs::remove_dir_all(&data).unwrap();
    hub.restart_carrier("alpha").await.unwrap();
    let terminals = hub
        .start_fleet(fleet.clone(), choice, OpenMode::Always)
        .await
        .unwrap();
    // The carrier no longer has them: nothing arrives until the relay offers them again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(terminals.recipients(&status.message_id).is_empty());

    clock.advance(Duration::from_secs(601));
    let done = hub
        .wait_for_message(&key, &status.message_id, |s| s.opened == s.matched)
        .await;
    assert_eq!(done.delivered, status.matched);
    for (user_id, item) in terminals.recipients(&status.message_id) {
        let copies = terminals
            .inbox(&user_id)
            .iter()
            .filter(|i| i.message_id == status.message_id)
            .count();
        assert_eq!(copies, 1, "{user_id}: {item:?}");
        let explained = hub
            .admin()
            .await
            .unwrap()
            .explain_delivery(pb::AdminExplainDeliveryRequest {
                message_id: status.message_id.clone(),
                user_id: user_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            explained.attempts.iter().any(|a| a
                .reason
                .contains("no receipt within 10m of hand-over: offered to the carrier again")),
            "{explained:?}"
        );
    }
    // Confirmed now: a later pass offers nothing again.
    clock.advance(Duration::from_secs(601));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = hub
        .wait_for_message(&key, &status.message_id, |_| true)
        .await;
    assert_eq!(later.handed_over, status.matched);
    assert_eq!((later.delivered, later.expired), (status.matched, 0));
    hub.shutdown().await.unwrap();
}

/// Deliveries no carrier ever confirms end: once their message has expired
/// (and the reconciliation's grace passed), they are expired at the relay
/// with an expired event each, so every accepted message ends.
async fn deliveries_no_carrier_confirms_expire_at_the_relay(backend: Backend) {
    let Some((mut hub, clock, key, status, _, _)) = held_broadcast(backend, 600, 0).await else {
        return;
    };
    // The carrier is gone for good.
    hub.kill_carrier("alpha").await;
    clock.advance(Duration::from_secs(6 * 3600 + 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = hub
        .wait_for_message(&key, &status.message_id, |_| true)
        .await;
    assert_eq!(
        before.expired, 0,
        "within the grace, nothing is expired yet"
    );
    clock.advance(Duration::from_secs(601));
    let done = hub
        .wait_for_message(&key, &status.message_id, |s| s.expired == s.matched)
        .await;
    assert_eq!((done.delivered, done.opened), (0, 0));
    hub.shutdown().await.unwrap();
}

backend_tests!(
    deliveries_a_carrier_lost_are_offered_again,
    deliveries_no_carrier_confirms_expire_at_the_relay,
    a_slow_carrier_leaves_a_visible_backlog_at_the_relay,
    a_targeted_message_overtakes_a_campaign_backlog,
    deliveries_released_below_the_cursor_go_while_the_lane_is_busy,
    two_relays_share_the_work_and_one_takes_over,
    a_carrier_killed_mid_campaign_loses_nothing,
    a_relay_killed_with_pending_deliveries_loses_nothing,
    every_answered_message_survives_a_relay_killed_mid_stream,
    deliveries_wait_for_terminals_to_attach,
);
