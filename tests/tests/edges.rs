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
            registrations: vec![chukei_proto::carrier::v1::SubscriberRegistration {
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
            vec![EnterpriseChoice::enterprise(&shop)],
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
    let listed = integration_tests::listed_refs(&mut client, 0)
        .await
        .unwrap();
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

/// Bytes as they are: a codec that sends a hand-made request body and
/// reads back whatever comes, to put what no generated client would send
/// on the wire.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut bytes);
        Ok(Some(bytes))
    }
}

/// What no well-behaved client sends: bytes that are not UTF-8 where a
/// string belongs, a 1 MiB body, a request over the size limit, 10,001
/// refs, instants before 1970 and after 9999, unknown enum numbers,
/// full-width digits in a phone number. Each is refused naming its field;
/// the relay stays up and what was accepted before is still there.
async fn hostile_wire_input_is_refused_and_nothing_is_lost(backend: Backend) {
    let Some(hub) = Hub::start(backend, &["alpha"]).await.unwrap() else {
        return;
    };
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(17, 1, &["alpha".into()]).with_every_channel();
    let mut hub = hub;
    hub.start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let mine = register(&hub, &fleet.users[0], &shop).await;
    let mut client = hub.enterprise(&key).await.unwrap();
    let refs = |refs: &[&str]| {
        pb::target::Kind::Refs(pb::RefList {
            refs: refs.iter().map(|r| (*r).to_owned()).collect(),
        })
    };
    let before = client
        .send_message(message("before", refs(&[&mine]), "kept"))
        .await
        .unwrap()
        .into_inner();

    // Field 1 (idempotency_key), length-delimited, two bytes that are not UTF-8.
    let channel = Channel::from_shared(hub.relay_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(vec![0x0a, 0x02, 0xff, 0xfe]);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let status = raw
        .unary(
            request,
            http::uri::PathAndQuery::from_static("/chukei.relay.v1.EnterpriseApi/SendMessage"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("idempotency_key"), "{status:?}");

    let huge = "x".repeat(1 << 20);
    assert_refused(
        client
            .send_message(message("mib", refs(&[&mine]), &huge))
            .await,
        Code::InvalidArgument,
        "content.text",
    );
    let over_limit = "x".repeat(17 << 20);
    let refused = client
        .send_message(message("over", refs(&[&mine]), &over_limit))
        .await
        .unwrap_err();
    assert!(
        matches!(refused.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{refused:?}"
    );
    let too_many: Vec<String> = (0..10_001).map(|i| format!("r{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_refused(
        client
            .send_message(message("many", refs(&too_many), "hi"))
            .await,
        Code::InvalidArgument,
        "target.refs",
    );
    for (seconds, words) in [(-1, "before 1970"), (i64::MAX, "after the year 9999")] {
        let mut early = message("time", refs(&[&mine]), "hi");
        early.expires_at = Some(prost_types::Timestamp { seconds, nanos: 0 });
        let status = client.send_message(early).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("expires_at") && status.message().contains(words));
    }
    let mut early_window = message("window", refs(&[&mine]), "hi");
    early_window.window = Some(common::DeliveryWindow {
        kind: Some(common::delivery_window::Kind::Absolute(
            common::AbsoluteWindow {
                start: Some(prost_types::Timestamp {
                    seconds: -86_400,
                    nanos: 0,
                }),
                end: Some(prost_types::Timestamp {
                    seconds: 86_400,
                    nanos: 0,
                }),
            },
        )),
    });
    assert_refused(
        client.send_message(early_window).await,
        Code::InvalidArgument,
        "window.absolute.start",
    );
    for (field, patch) in [
        (
            "priority",
            (|m: &mut pb::SendMessageRequest| m.priority = 99) as fn(&mut _),
        ),
        ("window_mode", |m| m.window_mode = 99),
        ("channel", |m| m.channel = -5),
    ] {
        let mut bad = message(field, refs(&[&mine]), "hi");
        patch(&mut bad);
        assert_refused(client.send_message(bad).await, Code::InvalidArgument, field);
    }
    let mut carrier_admin =
        chukei_proto::carrier::v1::carrier_admin_client::CarrierAdminClient::with_interceptor(
            Channel::from_shared(hub.carriers[0].url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
            BearerInterceptor::new(integration_tests::CARRIER_ADMIN_TOKEN).unwrap(),
        );
    let mut full_width = fleet.users[0].subscriber("alpha");
    full_width.phone_number = "+８１９０１２３４５６７８".into();
    assert_refused(
        carrier_admin
            .provision_subscribers(chukei_proto::carrier::v1::ProvisionSubscribersRequest {
                subscribers: vec![full_width],
            })
            .await,
        Code::InvalidArgument,
        "subscribers[0].phone_number",
    );

    // Still up; what was accepted is intact; the refused calls stored nothing.
    integration_tests::wait_healthy(&hub.relay_url())
        .await
        .unwrap();
    let status = hub
        .wait_for_message(&key, &before.message_id, |s| s.delivered == 1)
        .await;
    assert_eq!(status.matched, 1);
    let after = client
        .send_message(message("after", refs(&[&mine]), "still here"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.matched, Some(1));
    hub.shutdown().await.unwrap();
}

backend_tests!(
    hostile_wire_input_is_refused_and_nothing_is_lost,
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

/// A SQLite hub with carrier alpha and one terminal user (from `seed`)
/// registered with enterprise "shop": the hub, shop's key, the fleet and
/// the user's ref.
async fn one_registered_user(seed: u64) -> (Hub, String, Fleet, String) {
    let mut hub = Hub::start(Backend::Sqlite, &["alpha"])
        .await
        .unwrap()
        .unwrap();
    let (shop, key) = hub.create_enterprise("shop").await.unwrap();
    let fleet = Fleet::generate(seed, 1, &["alpha".into()]).with_every_channel();
    hub.start_fleet(fleet.clone(), vec![], OpenMode::Never)
        .await
        .unwrap();
    let mine = register(&hub, &fleet.users[0], &shop).await;
    (hub, key, fleet, mine)
}

/// Sends one message to `user_ref` and waits until its delivery is counted.
async fn one_message_is_delivered(hub: &Hub, key: &str, user_ref: &str, idempotency_key: &str) {
    let mut client = hub.enterprise(key).await.unwrap();
    let sent = client
        .send_message(message(
            idempotency_key,
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![user_ref.to_owned()],
            }),
            "hello",
        ))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(key, &sent.message_id, |s| s.delivered == 1)
        .await;
    assert_eq!(status.matched, 1);
}

/// A relay that speaks another version of the Deliver protocol (version 1
/// named no version; a later one names its number) is refused at the first
/// call with FAILED_PRECONDITION naming both versions, and the carrier's
/// stream with its own relay carries on: a message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_on_another_deliver_version_is_refused_naming_both() {
    use chukei_proto::carrier::v1 as cpb;
    let (hub, key, _, mine) = one_registered_user(23).await;
    let channel = Channel::from_shared(hub.carriers[0].url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let newer = chukei_proto::deliver::PROTOCOL_VERSION + 1;
    for (named, version) in [(None, 1), (Some(newer.to_string()), newer)] {
        let mut carrier = cpb::carrier_client::CarrierClient::with_interceptor(
            channel.clone(),
            BearerInterceptor::new(integration_tests::DELIVER_TOKEN).unwrap(),
        );
        let (_tx, rx) = tokio::sync::mpsc::channel::<cpb::RelayToCarrier>(1);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(named) = &named {
            request.metadata_mut().insert(
                chukei_proto::deliver::VERSION_HEADER,
                named.parse().unwrap(),
            );
        }
        let refused = carrier.deliver(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let words = format!(
            "the relay speaks version {version}, this side speaks version {}",
            chukei_proto::deliver::PROTOCOL_VERSION
        );
        assert!(refused.message().contains(&words), "{refused:?}");
    }
    one_message_is_delivered(&hub, &key, &mine, "after-refusals").await;
    hub.shutdown().await.unwrap();
}

/// A terminal written like grpcio's servers: it sends its response headers
/// only with its first events, which it has only once something was pushed.
/// It confirms every message it receives.
struct HeadersWithFirstEvents;

fn delivered(
    request: &chukei_proto::terminal::v1::PushRequest,
) -> chukei_proto::terminal::v1::TerminalEvents {
    use chukei_proto::terminal::v1 as tpb;
    tpb::TerminalEvents {
        events: request
            .messages
            .iter()
            .map(|m| tpb::TerminalEvent {
                delivery_id: m.delivery_id.clone(),
                message_id: m.message_id.clone(),
                user_id: m.user_id.clone(),
                kind: tpb::EventKind::Delivered as i32,
                at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                region: String::new(),
                trace_parent: String::new(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl chukei_proto::terminal::v1::terminal_server::Terminal for HeadersWithFirstEvents {
    type PushStream = tokio_stream::wrappers::ReceiverStream<
        Result<chukei_proto::terminal::v1::TerminalEvents, tonic::Status>,
    >;

    async fn push(
        &self,
        request: tonic::Request<tonic::Streaming<chukei_proto::terminal::v1::PushRequest>>,
    ) -> Result<tonic::Response<Self::PushStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        // No answer — so no headers — until there is an event to send.
        let first = loop {
            match inbound.message().await? {
                Some(request) if !request.messages.is_empty() => break request,
                Some(_) => continue,
                None => return Err(tonic::Status::cancelled("the carrier left")),
            }
        };
        let (events, events_rx) = tokio::sync::mpsc::channel(8);
        events.send(Ok(delivered(&first))).await.unwrap();
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                if events.send(Ok(delivered(&request))).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(events_rx),
        ))
    }
}

/// Serves `terminal` on a free port and attaches the fleet's first user
/// there: the carrier pushes to it from now on.
async fn attach_to<T>(
    hub: &Hub,
    fleet: &Fleet,
    terminal: T,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>>
where
    T: chukei_proto::terminal::v1::terminal_server::Terminal,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(chukei_proto::terminal::v1::terminal_server::TerminalServer::new(terminal))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    chukei_proto::carrier::v1::subscriber_api_client::SubscriberApiClient::connect(
        hub.carriers[0].url(),
    )
    .await
    .unwrap()
    .attach(chukei_proto::carrier::v1::AttachRequest {
        endpoint,
        user_ids: vec![fleet.users[0].user_id.clone()],
    })
    .await
    .unwrap();
    serving
}

/// The carrier does not wait for a terminal's response headers before it
/// pushes: a terminal that sends them only with its first events receives
/// its messages, and their delivery is counted at the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminal_that_answers_headers_late_still_gets_its_messages() {
    let (hub, key, fleet, mine) = one_registered_user(29).await;
    let terminal = attach_to(&hub, &fleet, HeadersWithFirstEvents).await;

    one_message_is_delivered(&hub, &key, &mine, "late-headers").await;
    terminal.abort();
    hub.shutdown().await.unwrap();
}

/// The relay does not wait for a carrier's response headers before it
/// sends batches: a carrier that answers only with its first
/// acknowledgement still gets its messages, handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_carrier_that_answers_headers_late_still_gets_its_batches() {
    let (hub, key, _, mine) = one_registered_user(31).await;
    let carrier = acking_carrier_for_alpha(
        &hub,
        integration_tests::AckingCarrier {
            headers_late: true,
            ..Default::default()
        },
    )
    .await;

    let mut client = hub.enterprise(&key).await.unwrap();
    let sent = client
        .send_message(message(
            "late-carrier-headers",
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![mine.clone()],
            }),
            "hello",
        ))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(&key, &sent.message_id, |s| s.handed_over == 1)
        .await;
    assert_eq!(status.matched, 1);
    carrier.abort();
    hub.shutdown().await.unwrap();
}

/// Targeted messages have a stream of their own to each carrier: a carrier
/// whose main stream is stuck (it reads nothing more of a campaign) still
/// takes them. On one shared stream the targeted batch would wait behind
/// the campaign's unread batches for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_carrier_stuck_on_its_campaign_stream_still_takes_targeted_messages() {
    let (hub, key, _, mine) = one_registered_user(32).await;
    let carrier = acking_carrier_for_alpha(
        &hub,
        integration_tests::AckingCarrier {
            stall_main: true,
            ..Default::default()
        },
    )
    .await;

    let mut client = hub.enterprise(&key).await.unwrap();
    let campaign = client
        .send_message(message(
            "stuck-campaign",
            pb::target::Kind::AllRegistered(true),
            "a campaign",
        ))
        .await
        .unwrap()
        .into_inner();
    let targeted = client
        .send_message(message(
            "through-the-priority-stream",
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![mine.clone()],
            }),
            "just for you",
        ))
        .await
        .unwrap()
        .into_inner();
    let status = hub
        .wait_for_message(&key, &targeted.message_id, |s| s.handed_over == 1)
        .await;
    assert_eq!(status.matched, 1);
    let stuck = hub
        .wait_for_message(&key, &campaign.message_id, |s| s.matched == 1)
        .await;
    assert_eq!(stuck.handed_over, 0, "the campaign's stream is stuck");
    carrier.abort();
    hub.shutdown().await.unwrap();
}

/// A terminal that never reads its carrier's main push stream past the
/// first request (it hangs on a campaign), and confirms everything pushed
/// on the priority stream (`chukei-push-lane: priority`).
struct StuckOnTheMainStream;

#[tonic::async_trait]
impl chukei_proto::terminal::v1::terminal_server::Terminal for StuckOnTheMainStream {
    type PushStream = tokio_stream::wrappers::ReceiverStream<
        Result<chukei_proto::terminal::v1::TerminalEvents, tonic::Status>,
    >;

    async fn push(
        &self,
        request: tonic::Request<tonic::Streaming<chukei_proto::terminal::v1::PushRequest>>,
    ) -> Result<tonic::Response<Self::PushStream>, tonic::Status> {
        let priority = chukei_proto::push::is_priority(request.metadata());
        let mut inbound = request.into_inner();
        let (events, events_rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            if !priority {
                // Holds the stream open and reads nothing more.
                let _first = inbound.message().await;
                events.closed().await;
                return;
            }
            while let Ok(Some(request)) = inbound.message().await {
                if !request.messages.is_empty()
                    && events.send(Ok(delivered(&request))).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(events_rx),
        ))
    }
}

/// Targeted messages have a push stream of their own to each terminal
/// endpoint, on a connection of its own: a terminal whose main stream is
/// stuck behind a campaign still receives them. On one shared stream the
/// targeted push would wait behind the campaign's for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminal_stuck_on_its_campaign_stream_still_gets_targeted_messages() {
    let (hub, key, fleet, mine) = one_registered_user(33).await;
    let terminal = attach_to(&hub, &fleet, StuckOnTheMainStream).await;

    let mut client = hub.enterprise(&key).await.unwrap();
    let campaign = client
        .send_message(message(
            "campaign-on-the-stuck-stream",
            pb::target::Kind::AllRegistered(true),
            "a campaign",
        ))
        .await
        .unwrap()
        .into_inner();
    hub.wait_for_message(&key, &campaign.message_id, |s| s.handed_over == 1)
        .await;
    one_message_is_delivered(&hub, &key, &mine, "through-the-priority-push").await;
    let stuck = client
        .get_message(pb::GetMessageRequest {
            message_id: campaign.message_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stuck.delivered, 0, "the campaign's push stream is stuck");
    terminal.abort();
    hub.shutdown().await.unwrap();
}

/// Serves `carrier` on a free port and registers it as "alpha": the relay
/// dials it for alpha from now on.
async fn acking_carrier_for_alpha(
    hub: &Hub,
    carrier: integration_tests::AckingCarrier,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(chukei_proto::carrier::v1::carrier_server::CarrierServer::new(carrier))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    hub.admin()
        .await
        .unwrap()
        .register_carrier(pb::RegisterCarrierRequest {
            carrier_id: "alpha".into(),
            endpoint,
            token: "a-token-of-another-carrier".into(),
        })
        .await
        .unwrap();
    serving
}
