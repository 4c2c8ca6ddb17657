//! The relay path end to end, on every backend: the right people get the
//! message on the right terminal, nobody else does, and every count is exact.

use std::collections::HashSet;

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::{
    Backend, Hub, backend_tests, refs_by_user, registered_users, send_request,
};

fn send(key: &str, target: pb::target::Kind, text: &str) -> pb::SendMessageRequest {
    send_request(key, target, text, common::Channel::Rcs)
}
use terminal_sim::fleet::{Fleet, SimUser};
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;

const SEED: u64 = 7;
const USERS: usize = 120;

fn ids<'a>(users: impl IntoIterator<Item = &'a SimUser>) -> HashSet<String> {
    users.into_iter().map(|u| u.user_id.clone()).collect()
}

async fn every_target_kind_reaches_exactly_its_people(backend: Backend) {
    // This fleet's segment is small: the minimum cohort is trust.rs's subject.
    let settings = integration_tests::Settings {
        min_cohort: 1,
        ..Default::default()
    };
    let Some(mut hub) = Hub::start_settings(backend, &["alpha", "beta"], settings)
        .await
        .unwrap()
    else {
        return;
    };
    let (shop, shop_key) = hub.create_enterprise("shop").await.unwrap();
    let (other, _) = hub.create_enterprise("other").await.unwrap();
    let service = hub.create_service(&shop, "loyalty").await.unwrap();
    let fleet = Fleet::generate(SEED, USERS, &["alpha".into(), "beta".into()]).with_every_channel();
    let terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![
                EnterpriseChoice {
                    enterprise_id: shop.clone(),
                    service_ids: vec![service.clone()],
                },
                EnterpriseChoice {
                    enterprise_id: other.clone(),
                    service_ids: vec![],
                },
            ],
            OpenMode::Always,
        )
        .await
        .unwrap();
    let shop_users = registered_users(&fleet, &shop);
    let only_other: Vec<&SimUser> = fleet
        .users
        .iter()
        .filter(|u| !shop_users.contains_key(&u.user_id) && u.consent_for(SEED, &other).is_some())
        .collect();
    assert!(
        !only_other.is_empty(),
        "the fleet should have users registered only with the other enterprise"
    );
    let mut client = hub.enterprise(&shop_key).await.unwrap();

    // Everyone registered.
    let all = client
        .send_message(send(
            "all",
            pb::target::Kind::AllRegistered(true),
            "hello all",
        ))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(&shop_key, &all.message_id, |s| {
            s.matched > 0 && s.opened == s.matched
        })
        .await;
    let expected = ids(shop_users.values());
    assert_eq!(status.matched as usize, expected.len());
    assert_eq!(status.handed_over, status.matched);
    assert_eq!(status.delivered, status.matched);
    let reached: HashSet<String> = terminals.recipients(&all.message_id).into_keys().collect();
    assert_eq!(
        reached, expected,
        "broadcast must reach exactly the shop's registered users"
    );
    assert!(only_other.iter().all(|u| !reached.contains(&u.user_id)));
    // On the instructed channel, on the user's primary carrier.
    for (user_id, item) in terminals.recipients(&all.message_id) {
        assert_eq!(item.channel, common::Channel::Rcs as i32);
        assert_eq!(item.carrier_id, shop_users[&user_id].carriers[0]);
        assert_eq!(item.text, "hello all");
    }

    // One service's users.
    let by_service = client
        .send_message(send(
            "svc",
            pb::target::Kind::ServiceId(service.clone()),
            "members only",
        ))
        .await
        .unwrap()
        .into_inner();
    let expected: HashSet<String> = shop_users
        .values()
        .filter(|u| u.joins_service(SEED, &service))
        .map(|u| u.user_id.clone())
        .collect();
    let status = hub
        .wait_for_message(&shop_key, &by_service.message_id, |s| {
            s.state == pb::MessageState::HandedOver as i32 && s.delivered == s.matched
        })
        .await;
    assert_eq!(status.matched as usize, expected.len());
    let reached: HashSet<String> = terminals
        .recipients(&by_service.message_id)
        .into_keys()
        .collect();
    assert_eq!(reached, expected);

    // An attribute segment: women whose consented age lies within 20-49 and
    // who share their region, in the prefecture of the first such woman.
    // Consent draws depend on the enterprise id, new each run, so a fixed
    // prefecture matched nobody in about one run in ten (and an empty
    // segment is refused).
    let now = chukei_proto::clock::Clock::system().now_ms();
    let in_segment_but_place = |u: &SimUser| {
        let consent = u.consent_for(SEED, &shop).unwrap();
        let Some(age) = carrier_svc::consent::age_on(&u.birth_date, now) else {
            return false;
        };
        let (min, max) = match consent.age {
            2 => (age, age),
            3 => (age / 10 * 10, age / 10 * 10 + 9),
            _ => return false,
        };
        consent.gender
            && u.gender == common::Gender::Female as i32
            && min >= 20
            && max <= 49
            && consent.region >= 2
    };
    let prefecture = shop_users
        .values()
        .filter(|u| in_segment_but_place(u))
        .filter_map(|u| u.home_region.split_once('/').map(|(p, _)| p.to_owned()))
        .min()
        .expect("a woman of 20-49 sharing her age and region among 120 people");
    let segment = pb::Segment {
        gender: common::Gender::Female as i32,
        age_min: Some(20),
        age_max: Some(49),
        regions: vec![prefecture.clone()],
        ..Default::default()
    };
    let expected: HashSet<String> = shop_users
        .values()
        .filter(|u| in_segment_but_place(u) && u.home_region.starts_with(&format!("{prefecture}/")))
        .map(|u| u.user_id.clone())
        .collect();
    assert!(!expected.is_empty());
    let by_segment = client
        .send_message(send("seg", pb::target::Kind::Segment(segment), "for you"))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(&shop_key, &by_segment.message_id, |s| {
            s.state == pb::MessageState::HandedOver as i32 && s.delivered == s.matched
        })
        .await;
    assert_eq!(
        status.matched as usize,
        expected.len(),
        "segment must match exactly the consenting users"
    );
    let reached: HashSet<String> = terminals
        .recipients(&by_segment.message_id)
        .into_keys()
        .collect();
    assert_eq!(reached, expected);

    // Specific refs.
    let refs = refs_by_user(&hub, &fleet, &shop).await;
    let chosen: Vec<(&String, &String)> = refs.iter().take(3).collect();
    let targeted = client
        .send_message(send(
            "refs",
            pb::target::Kind::Refs(pb::RefList {
                refs: chosen.iter().map(|(_, r)| (*r).clone()).collect(),
            }),
            "just you",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        targeted.matched,
        Some(3),
        "refs targets are matched at once"
    );
    hub.wait_for_message(&shop_key, &targeted.message_id, |s| s.delivered == 3)
        .await;
    let reached: HashSet<String> = terminals
        .recipients(&targeted.message_id)
        .into_keys()
        .collect();
    assert_eq!(
        reached,
        chosen
            .iter()
            .map(|(u, _)| (*u).clone())
            .collect::<HashSet<_>>()
    );

    hub.shutdown().await.unwrap();
}

backend_tests!(every_target_kind_reaches_exactly_its_people);
