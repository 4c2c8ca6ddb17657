//! What the relay refuses, and how: every bad input gets the right code and a
//! message naming the field; idempotency keys replay or refuse; tenants never
//! see each other's users.

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::carrier_ingress_client::CarrierIngressClient;
use integration_tests::{Backend, Hub, backend_tests, send_request};

fn message(key: &str, target: pb::target::Kind, text: &str) -> pb::SendMessageRequest {
    send_request(key, target, text, common::Channel::Unspecified)
}
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;
use tonic::Code;
use tonic::transport::Channel;

fn assert_refused(
    result: Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>,
    code: Code,
    field: &str,
) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} must name {field}",
        status.message()
    );
}

/// Registers one fleet user with `enterprise` through its carrier and returns the ref.
async fn register(hub: &Hub, user: &terminal_sim::fleet::SimUser, enterprise_id: &str) -> String {
    let carrier = hub
        .carriers
        .iter()
        .find(|c| c.carrier_id == user.carriers[0])
        .unwrap();
    let mut client =
        chukei_proto::carrier::v1::subscriber_api_client::SubscriberApiClient::connect(
            carrier.url(),
        )
        .await
        .unwrap();
    client
        .register(chukei_proto::carrier::v1::RegisterRequest {
            registrations: vec![chukei_proto::carrier::v1::Registration {
                user_id: user.user_id.clone(),
                enterprise_id: enterprise_id.into(),
                service_id: String::new(),
                consent: Some(Default::default()),
                text_version: carrier_svc::consent::TEXT_VERSION.into(),
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .user_refs
        .remove(0)
}

async fn bad_input_is_refused_naming_the_field(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let (rival, _) = hub.create_enterprise("rival").await.unwrap();
    let fleet = Fleet::generate(3, 4, &["alpha".into()]).with_every_channel();
    hub.start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let mine = register(&hub, &fleet.users[0], &shop).await;
    let foreign = register(&hub, &fleet.users[1], &rival).await;
    let mut client = hub.enterprise(&key).await.unwrap();
    let refs = |refs: &[&str]| {
        pb::target::Kind::Refs(pb::RefList {
            refs: refs.iter().map(|r| (*r).to_owned()).collect(),
        })
    };

    assert_refused(
        client
            .send_message(message("a", refs(&[&mine, "r-nobody"]), "hi"))
            .await,
        Code::NotFound,
        "target.refs[1]",
    );
    // Another enterprise's ref is as unknown as a made-up one: nothing leaks.
    assert_refused(
        client
            .send_message(message("b", refs(&[&foreign]), "hi"))
            .await,
        Code::NotFound,
        "target.refs[0]",
    );
    assert_refused(
        client
            .send_message(message("c", refs(&[&mine]), "  "))
            .await,
        Code::InvalidArgument,
        "content.text",
    );
    assert_refused(
        client.send_message(message("", refs(&[&mine]), "hi")).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    assert_refused(
        client.send_message(message("d", refs(&[]), "hi")).await,
        Code::InvalidArgument,
        "target.refs",
    );
    let mut no_target = message("e", refs(&[&mine]), "hi");
    no_target.target = None;
    assert_refused(
        client.send_message(no_target).await,
        Code::InvalidArgument,
        "target",
    );
    let empty_segment = pb::target::Kind::Segment(pb::Segment::default());
    assert_refused(
        client.send_message(message("f", empty_segment, "hi")).await,
        Code::InvalidArgument,
        "target.segment",
    );
    let bad_age = pb::target::Kind::Segment(pb::Segment {
        age_min: Some(40),
        age_max: Some(30),
        ..Default::default()
    });
    assert_refused(
        client.send_message(message("g", bad_age, "hi")).await,
        Code::InvalidArgument,
        "target.segment.age",
    );
    let bad_region = pb::target::Kind::Segment(pb::Segment {
        regions: vec!["Tokyo City".into()],
        ..Default::default()
    });
    assert_refused(
        client.send_message(message("h", bad_region, "hi")).await,
        Code::InvalidArgument,
        "target.segment.regions[0]",
    );
    let mut bad_channel = message("i", refs(&[&mine]), "hi");
    bad_channel.channel = 99;
    assert_refused(
        client.send_message(bad_channel).await,
        Code::InvalidArgument,
        "channel",
    );
    assert_refused(
        client
            .send_message(message(
                "j",
                pb::target::Kind::ServiceId("svc_nope".into()),
                "hi",
            ))
            .await,
        Code::NotFound,
        "target.service_id",
    );
    assert_refused(
        client
            .get_message(pb::GetMessageRequest {
                message_id: "msg_nope".into(),
            })
            .await,
        Code::NotFound,
        "message_id",
    );

    // Credentials.
    let channel = Channel::from_shared(hub.relay_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = pb::enterprise_api_client::EnterpriseApiClient::with_interceptor(
        channel.clone(),
        BearerInterceptor::none(),
    );
    assert_refused(
        anonymous
            .send_message(message("k", refs(&[&mine]), "hi"))
            .await,
        Code::Unauthenticated,
        "API key",
    );
    let mut wrong = hub.enterprise("ck_not-a-real-key").await.unwrap();
    assert_refused(
        wrong.send_message(message("l", refs(&[&mine]), "hi")).await,
        Code::Unauthenticated,
        "API key",
    );
    let mut carrier = CarrierIngressClient::with_interceptor(
        channel.clone(),
        BearerInterceptor::new("wrong-carrier-token-123").unwrap(),
    );
    assert_refused(
        carrier
            .upsert_contracts(pb::UpsertContractsRequest {
                contracts: vec![pb::Contract {
                    user_id: "u".into(),
                    primary: true,
                    active: true,
                }],
            })
            .await,
        Code::Unauthenticated,
        "carrier token",
    );
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel,
        BearerInterceptor::new("not-the-admin-token").unwrap(),
    );
    assert_refused(
        admin
            .create_enterprise(pb::CreateEnterpriseRequest {
                name: "x".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "authorization",
    );

    // A carrier can only register its own subscribers.
    let mut alpha = CarrierIngressClient::with_interceptor(
        Channel::from_shared(hub.relay_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
        BearerInterceptor::new(&hub.carriers[0].token).unwrap(),
    );
    assert_refused(
        alpha
            .register_users(pb::RegisterUsersRequest {
                registrations: vec![pb::UserRegistration {
                    user_id: "someone-elses".into(),
                    enterprise_id: shop.clone(),
                    service_id: String::new(),
                    profile: None,
                    text_version: "v1".into(),
                }],
            })
            .await,
        Code::NotFound,
        "registrations[0].user_id",
    );

    // Nothing refused above was accepted: the one good message still gets the only id.
    let accepted = client
        .send_message(message("ok", refs(&[&mine]), "hi"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.matched, Some(1));
    hub.shutdown().await.unwrap();
}

async fn idempotency_keys_replay_or_refuse(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let (other, other_key) = hub.create_enterprise("other").await.unwrap();
    let fleet = Fleet::generate(5, 3, &["alpha".into()]).with_every_channel();
    let terminals = hub
        .start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let mine = register(&hub, &fleet.users[0], &shop).await;
    let theirs = register(&hub, &fleet.users[1], &other).await;
    let target = || {
        pb::target::Kind::Refs(pb::RefList {
            refs: vec![mine.clone()],
        })
    };
    let mut client = hub.enterprise(&key).await.unwrap();

    let first = client
        .send_message(message("same", target(), "sale"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .send_message(message("same", target(), "sale"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.message_id, again.message_id);
    assert_refused(
        client
            .send_message(message("same", target(), "other sale"))
            .await,
        Code::AlreadyExists,
        "idempotency_key",
    );
    // Keys are per enterprise: another tenant may use the same key.
    let mut other_client = hub.enterprise(&other_key).await.unwrap();
    let theirs = other_client
        .send_message(message(
            "same",
            pb::target::Kind::Refs(pb::RefList { refs: vec![theirs] }),
            "sale",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.message_id, first.message_id);
    // And cannot read ours.
    assert_refused(
        other_client
            .get_message(pb::GetMessageRequest {
                message_id: first.message_id.clone(),
            })
            .await,
        Code::NotFound,
        "message_id",
    );

    hub.wait_for_message(&key, &first.message_id, |s| s.delivered == 1)
        .await;
    // The retry delivered nothing twice.
    let user = &fleet.users[0].user_id;
    assert_eq!(terminals.inbox(user).len(), 1);
    assert_eq!(terminals.snapshot().duplicates, 0);
    hub.shutdown().await.unwrap();
}

async fn a_user_with_two_carriers_counts_once(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha", "beta"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(11, 60, &["alpha".into(), "beta".into()]).with_every_channel();
    let twice: Vec<_> = fleet
        .users
        .iter()
        .filter(|u| u.carriers.len() == 2)
        .cloned()
        .collect();
    assert!(!twice.is_empty());
    let terminals = hub
        .start_fleet(
            fleet.clone(),
            vec![EnterpriseChoice {
                enterprise_id: shop.clone(),
                service_ids: vec![],
            }],
            OpenMode::Always,
        )
        .await
        .unwrap();
    let registered = integration_tests::registered_users(&fleet, &shop);
    let mut client = hub.enterprise(&key).await.unwrap();
    let mut request = message("both", pb::target::Kind::AllRegistered(true), "everywhere");
    request.all_carriers = true;
    let sent = client.send_message(request).await.unwrap().into_inner();
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| {
            s.matched > 0 && s.opened == s.matched
        })
        .await;
    assert_eq!(status.matched as usize, registered.len());
    assert_eq!(
        status.delivered, status.matched,
        "one send per person, however many carriers"
    );
    assert_eq!(status.opened, status.matched, "at most one open per person");
    // Those with two carriers really got it on both.
    let both: Vec<_> = twice
        .iter()
        .filter(|u| registered.contains_key(&u.user_id))
        .collect();
    assert!(!both.is_empty());
    for user in both {
        let carriers: std::collections::HashSet<String> = terminals
            .inbox(&user.user_id)
            .into_iter()
            .map(|i| i.carrier_id)
            .collect();
        assert_eq!(
            carriers.len(),
            2,
            "{} should have the message from both carriers",
            user.user_id
        );
    }
    // Primary only by default.
    let primary = client
        .send_message(message(
            "primary",
            pb::target::Kind::AllRegistered(true),
            "once",
        ))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &primary.message_id, |s| {
        s.matched > 0 && s.delivered == s.matched
    })
    .await;
    assert_eq!(
        terminals.recipients(&primary.message_id).len(),
        registered.len()
    );
    for (user_id, item) in terminals.recipients(&primary.message_id) {
        assert_eq!(item.carrier_id, registered[&user_id].carriers[0]);
    }
    hub.shutdown().await.unwrap();
}

async fn unregistering_and_profile_changes_change_who_is_reached(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(13, 3, &["alpha".into()]).with_every_channel();
    let terminals = hub
        .start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let mut refs = Vec::new();
    for user in &fleet.users {
        refs.push(register(&hub, user, &shop).await);
    }
    let mut alpha = CarrierIngressClient::with_interceptor(
        Channel::from_shared(hub.relay_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
        BearerInterceptor::new(&hub.carriers[0].token).unwrap(),
    );
    let mut client = hub.enterprise(&key).await.unwrap();
    let engineers = || {
        pb::target::Kind::Segment(pb::Segment {
            occupations: vec!["engineer".into()],
            ..Default::default()
        })
    };

    // Nobody shared an occupation yet, then one person does: a segment of
    // fewer people than the minimum cohort is refused either way, with the
    // same words, so the refusal does not tell how many it matched.
    let refused = |result: Result<tonic::Response<pb::SendMessageResponse>, tonic::Status>| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        status.message().to_owned()
    };
    let none = refused(
        client
            .send_message(message("seg-0", engineers(), "hi"))
            .await,
    );
    assert!(
        none.starts_with("target.segment: matches too few people"),
        "{none}"
    );
    alpha
        .put_profile(pb::PutProfileRequest {
            user_id: fleet.users[0].user_id.clone(),
            enterprise_id: shop.clone(),
            profile: Some(common::ConsentedProfile {
                occupation: "engineer".into(),
                ..Default::default()
            }),
            text_version: "v1".into(),
        })
        .await
        .unwrap();
    let one = refused(
        client
            .send_message(message("seg-1", engineers(), "hi"))
            .await,
    );
    assert_eq!(one, none);

    // User 0 leaves: their ref is gone, broadcasts skip them, their profile is gone.
    let removed = alpha
        .unregister_users(pb::UnregisterUsersRequest {
            unregistrations: vec![pb::UserUnregistration {
                user_id: fleet.users[0].user_id.clone(),
                enterprise_id: shop.clone(),
                service_id: String::new(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, 1);
    let listed: Vec<String> = client
        .list_registrations(pb::ListRegistrationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .registrations
        .into_iter()
        .map(|r| r.user_ref)
        .collect();
    assert!(!listed.contains(&refs[0]));
    assert_eq!(listed.len(), 2);
    assert_refused(
        client
            .send_message(message(
                "gone",
                pb::target::Kind::Refs(pb::RefList {
                    refs: vec![refs[0].clone()],
                }),
                "hi",
            ))
            .await,
        Code::NotFound,
        "target.refs[0]",
    );
    let all = client
        .send_message(message("all", pb::target::Kind::AllRegistered(true), "hi"))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &all.message_id, |s| {
        s.matched == 2 && s.delivered == 2
    })
    .await;
    assert!(
        !terminals
            .recipients(&all.message_id)
            .contains_key(&fleet.users[0].user_id)
    );
    assert_refused(
        alpha
            .put_profile(pb::PutProfileRequest {
                user_id: fleet.users[0].user_id.clone(),
                enterprise_id: shop.clone(),
                profile: None,
                text_version: "v1".into(),
            })
            .await,
        Code::NotFound,
        "user_id",
    );
    hub.shutdown().await.unwrap();
}

backend_tests!(
    unregistering_and_profile_changes_change_who_is_reached,
    bad_input_is_refused_naming_the_field,
    idempotency_keys_replay_or_refuse,
    a_user_with_two_carriers_counts_once,
);

/// An enterprise over its call rate is refused with RESOURCE_EXHAUSTED and a
/// retry hint (google.rpc.RetryInfo), and gets through after it; another
/// enterprise calling at the same time is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_enterprise_over_its_rate_leaves_the_others_alone() {
    use tonic_types::StatusExt;
    let settings = integration_tests::Settings {
        enterprise_rate_per_sec: 5,
        ..integration_tests::Settings::default()
    };
    let hub = Hub::start_settings(Backend::Sqlite, &["alpha"], settings)
        .await
        .unwrap()
        .unwrap();
    let (_, busy_key) = hub.create_enterprise("busy").await.unwrap();
    let (_, calm_key) = hub.create_enterprise("calm").await.unwrap();
    let mut busy = hub.enterprise(&busy_key).await.unwrap();
    let mut calm = hub.enterprise(&calm_key).await.unwrap();
    let list = || pb::ListRegistrationsRequest {
        page_size: 1,
        ..Default::default()
    };
    let mut refused = Vec::new();
    for _ in 0..20 {
        if let Err(status) = busy.list_registrations(list()).await {
            refused.push(status);
        }
    }
    assert!(refused.len() >= 5, "{} of 20 refused", refused.len());
    let status = &refused[0];
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().starts_with("rate limit:"), "{status:?}");
    let retry = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry hint");
    assert!(retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_secs(1));
    // The other enterprise has its own allowance.
    for _ in 0..5 {
        calm.list_registrations(list()).await.unwrap();
    }
    tokio::time::sleep(retry).await;
    busy.list_registrations(list()).await.unwrap();
    hub.shutdown().await.unwrap();
}
