//! A small hub on one manual clock shared by the relay, the carrier and the
//! terminals — a scene tests drive by advancing time instead of sleeping —
//! and the request builders those tests share.

use std::collections::HashMap;
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::{InboxItem, OpenMode, Terminals};

use crate::{Backend, Enterprise, Hub, Settings, refs_by_user};

/// 2026-11-26T00:00:00Z (09:00 in Tokyo).
pub const START_MS: i64 = 1_795_651_200_000;
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Scene {
    pub hub: Hub,
    pub clock: Clock,
    pub fleet: Fleet,
    pub terminals: Terminals,
    /// (enterprise id, API key, client, refs by user id)
    pub enterprises: Vec<(String, String, Enterprise, HashMap<String, String>)>,
}

/// How a scene is set up.
pub struct Setup {
    pub users: usize,
    pub enterprises: usize,
    /// Whether user `i` opens what reaches them (within the hour, any channel).
    pub opener: fn(usize) -> bool,
    pub settings: Settings,
    pub open_mode: OpenMode,
    /// Adjusts the fleet before it starts (capabilities, propensities).
    pub tailor: fn(&mut Fleet),
    /// The carriers people are contracted with (some with several).
    pub carriers: &'static [&'static str],
}

/// Every second person (0, 2, 4, …) opens what reaches them; the rest never do.
pub fn half_open() -> Setup {
    Setup {
        opener: |i| i % 2 == 0,
        ..Setup::default()
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            users: 8,
            enterprises: 1,
            opener: |_| true,
            settings: Settings::default(),
            open_mode: OpenMode::Model,
            tailor: |_| {},
            carriers: &["alpha"],
        }
    }
}

pub async fn scene(backend: Backend, setup: Setup) -> Option<Scene> {
    let clock = Clock::manual(START_MS);
    let settings = Settings {
        clock: Some(clock.clone()),
        message_ttl_secs: 7 * 24 * 3600,
        ..setup.settings
    };
    let mut hub = Hub::start_settings(backend, setup.carriers, settings)
        .await
        .unwrap()?;
    let mut enterprises = Vec::new();
    for index in 0..setup.enterprises {
        let (id, key) = hub
            .create_enterprise(&format!("brand-{index}"))
            .await
            .unwrap();
        enterprises.push((id, key));
    }
    let carriers: Vec<String> = setup.carriers.iter().map(|c| (*c).to_owned()).collect();
    let mut fleet = Fleet::generate(31, setup.users, &carriers).with_every_channel();
    for (index, user) in fleet.users.iter_mut().enumerate() {
        let behaviour = &mut user.behaviour;
        behaviour.registration_share = 1.0;
        behaviour.active_start_hour = 0;
        behaviour.active_hours = 24;
        behaviour.away_share = 0.0;
        behaviour.open_propensity = if (setup.opener)(index) {
            [0.0, 1.0, 1.0, 1.0, 1.0]
        } else {
            [0.0; 5]
        };
    }
    (setup.tailor)(&mut fleet);
    let choices = enterprises
        .iter()
        .map(|(id, _)| EnterpriseChoice {
            enterprise_id: id.clone(),
            service_ids: vec![],
        })
        .collect();
    let terminals = hub
        .start_fleet(fleet.clone(), choices, setup.open_mode)
        .await
        .unwrap();
    let mut with_clients = Vec::new();
    for (id, key) in enterprises {
        let client = hub.enterprise(&key).await.unwrap();
        let refs = refs_by_user(&hub, &fleet, &id).await;
        with_clients.push((id, key, client, refs));
    }
    Some(Scene {
        hub,
        clock,
        fleet,
        terminals,
        enterprises: with_clients,
    })
}

impl Scene {
    pub fn user(&self, index: usize) -> String {
        self.fleet.users[index].user_id.clone()
    }

    pub fn client(&self, enterprise: usize) -> Enterprise {
        self.enterprises[enterprise].2.clone()
    }

    pub fn ref_of(&self, enterprise: usize, index: usize) -> String {
        self.enterprises[enterprise].3[&self.user(index)].clone()
    }

    pub async fn send(&self, enterprise: usize, request: pb::SendMessageRequest) -> String {
        self.client(enterprise)
            .send_message(request)
            .await
            .unwrap()
            .into_inner()
            .message_id
    }

    pub async fn status(&self, enterprise: usize, message_id: &str) -> pb::MessageStatus {
        self.client(enterprise)
            .get_message(pb::GetMessageRequest {
                message_id: message_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn wait(
        &self,
        enterprise: usize,
        message_id: &str,
        done: impl Fn(&pb::MessageStatus) -> bool,
    ) -> pb::MessageStatus {
        self.hub
            .wait_for_message(&self.enterprises[enterprise].1, message_id, done)
            .await
    }

    /// Waits until the enterprise's statistics (the relay's rollups, which
    /// trail the events) count `delivered` deliveries and `opened` opens
    /// over the last 30 days.
    pub async fn wait_for_stats(&self, enterprise: usize, delivered: u64, opened: u64) {
        let what = format!("{delivered} deliveries and {opened} opens in the statistics");
        crate::eventually(&what, WAIT, || async {
            let stats = self
                .client(enterprise)
                .get_stats(pb::GetStatsRequest {
                    lookback: Some(prost_types::Duration {
                        seconds: 30 * 24 * 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let totals = stats.rows.first().map(|row| (row.delivered, row.opened));
            (totals == Some((delivered, opened))).then_some(())
        })
        .await;
    }

    /// What user `index` received of `message_id`, oldest first.
    pub fn items(&self, index: usize, message_id: &str) -> Vec<InboxItem> {
        self.terminals
            .inbox(&self.user(index))
            .into_iter()
            .filter(|item| item.message_id == message_id)
            .collect()
    }

    pub fn advance(&self, ms: i64) {
        self.clock.advance(Duration::from_millis(ms as u64));
    }

    /// How many of user `index`'s attempts of `message_id` the relay has
    /// recorded as handed over (their policy timers are running).
    pub async fn handed_over(&self, enterprise: usize, message_id: &str, index: usize) -> usize {
        self.explain(enterprise, message_id, index)
            .await
            .attempts
            .iter()
            .filter(|a| a.handed_over_at.is_some())
            .count()
    }

    pub async fn explain(
        &self,
        enterprise: usize,
        message_id: &str,
        index: usize,
    ) -> pb::DeliveryExplanation {
        self.client(enterprise)
            .explain_delivery(pb::ExplainDeliveryRequest {
                message_id: message_id.into(),
                user_ref: self.ref_of(enterprise, index),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

pub fn channel(channel: common::Channel) -> i32 {
    channel as i32
}

pub fn policy(
    kind: pb::PolicyKind,
    channels: &[common::Channel],
    timeout_ms: i64,
    max_resends: u32,
) -> pb::DeliveryPolicy {
    pb::DeliveryPolicy {
        kind: kind as i32,
        channels: channels.iter().map(|c| *c as i32).collect(),
        timeout: (timeout_ms > 0).then_some(prost_types::Duration {
            seconds: timeout_ms / 1000,
            nanos: 0,
        }),
        max_resends,
        resend_until: 0,
    }
}

pub fn request(key: &str, target: pb::target::Kind, text: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        idempotency_key: key.into(),
        target: Some(pb::Target { kind: Some(target) }),
        content: Some(common::Content {
            text: text.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn everyone(key: &str, text: &str) -> pb::SendMessageRequest {
    request(key, pb::target::Kind::AllRegistered(true), text)
}

/// Gives the system a moment of real time, for checks that nothing happens.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(1_500)).await;
}
