//! The isolation matrix: every RPC of every service, called with a
//! credential of the wrong role (or none, or a made-up one), is refused as
//! unauthenticated before it reads its request; every enterprise RPC that
//! names an id, called by another enterprise with the first one's ids, is
//! refused exactly as if the id did not exist — nothing tells "not yours"
//! from "no such thing". The tenant is only ever taken from the credential.

use chukei_proto::auth::BearerInterceptor;
use chukei_proto::carrier::v1 as cpb;
use chukei_proto::clock::to_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::{
    ADMIN_TOKEN, Backend, CARRIER_ADMIN_TOKEN, DELIVER_TOKEN, Hub, backend_tests, send_request,
};
use terminal_sim::fleet::Fleet;
use terminal_sim::setup::EnterpriseChoice;
use terminal_sim::terminal::OpenMode;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Authed = InterceptedService<Channel, BearerInterceptor>;

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `(code, message)` of a refused call.
fn refusal<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, String) {
    let status = result.expect_err("must be refused");
    (status.code(), status.message().to_owned())
}

/// Calls every listed RPC of `$client` with a default request and expects
/// each to be refused with `$code`.
macro_rules! all_refused {
    ($what:expr, $client:expr, $code:expr, [$($rpc:ident),* $(,)?]) => {{
        $(
            let (code, message) =
                refusal($client.clone().$rpc(tonic::Request::new(Default::default())).await);
            assert_eq!(code, $code, "{} with {}: {message}", stringify!($rpc), $what);
        )*
    }};
}

async fn wrong_roles_and_wrong_tenants_are_refused_alike(backend: Backend) {
    let Some(mut hub) = Hub::start(backend, &["alpha", "beta"]).await.unwrap() else {
        return;
    };
    let (shop, shop_key) = hub.create_enterprise("shop").await.unwrap();
    let (_rival, rival_key) = hub.create_enterprise("rival").await.unwrap();
    let service = hub.create_service(&shop, "loyalty").await.unwrap();
    let fleet = Fleet::generate(9, 4, &["alpha".into()]).with_every_channel();
    hub.start_fleet(
        fleet.clone(),
        vec![EnterpriseChoice::enterprise(&shop)],
        OpenMode::Never,
    )
    .await
    .unwrap();
    let refs = integration_tests::refs_by_user(&hub, &fleet, &shop).await;
    let shop_ref = refs
        .values()
        .next()
        .expect("someone registered with shop")
        .clone();
    let user_id = refs.keys().next().unwrap().clone();

    let mut shop_client = hub.enterprise(&shop_key).await.unwrap();
    let message = shop_client
        .send_message(send_request(
            "mine",
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![shop_ref.clone()],
            }),
            "hello",
            common::Channel::Sms,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut admin = hub.admin().await.unwrap();
    let now = chukei_proto::clock::Clock::system().now_ms();
    let slot = admin
        .open_auction_slot(pb::OpenAuctionSlotRequest {
            channel: common::Channel::Sms as i32,
            starts_at: Some(to_timestamp(now + 2 * 3_600_000)),
            ends_at: Some(to_timestamp(now + 4 * 3_600_000)),
            capacity: 6,
            closes_at: Some(to_timestamp(now + 3_600_000)),
            reserve_price: 3,
            rule: pb::PricingRule::Uniform as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let bid = shop_client
        .place_bid(pb::PlaceBidRequest {
            slot_id: slot.slot_id.clone(),
            quantity: 2,
            price: 5,
        })
        .await
        .unwrap()
        .into_inner();

    let webhook = shop_client
        .add_webhook(pb::AddWebhookRequest {
            url: "http://127.0.0.1:9/hooks".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();

    let relay = channel(&hub.relay_url()).await;
    let with = |secret: &str| -> Authed {
        InterceptedService::new(relay.clone(), BearerInterceptor::new(secret).unwrap())
    };
    let alpha_token = hub.carriers[0].token.clone();
    let wrong_roles = [
        ("no credential", None),
        (
            "a made-up key",
            Some("ck_0000000000000000000000000000000000"),
        ),
        ("a carrier token", Some(alpha_token.as_str())),
        ("the admin token", Some(ADMIN_TOKEN)),
        ("the deliver token", Some(DELIVER_TOKEN)),
    ];

    // EnterpriseApi: only an enterprise key.
    for (what, secret) in wrong_roles {
        let client = match secret {
            Some(secret) => pb::enterprise_api_client::EnterpriseApiClient::new(with(secret)),
            None => pb::enterprise_api_client::EnterpriseApiClient::new(with("")),
        };
        all_refused!(
            what,
            client,
            Code::Unauthenticated,
            [
                send_message,
                get_message,
                list_registrations,
                explain_delivery,
                get_stats,
                quote_message,
                get_prices,
                get_statement,
                list_auction_slots,
                place_bid,
                get_bid,
                add_webhook,
                list_webhooks,
                rotate_webhook_secret,
                remove_webhook,
                resume_webhook,
                list_webhook_attempts,
            ]
        );
        let stream = tokio_stream::iter(Vec::<pb::SendMessageRequest>::new());
        let (code, message) = refusal(client.clone().send_messages(stream).await);
        assert_eq!(
            code,
            Code::Unauthenticated,
            "send_messages with {what}: {message}"
        );
    }
    // CarrierIngress: only a carrier token.
    for (what, secret) in [
        ("no credential", ""),
        ("an enterprise key", shop_key.as_str()),
        ("the admin token", ADMIN_TOKEN),
        ("the deliver token", DELIVER_TOKEN),
    ] {
        let client = pb::carrier_ingress_client::CarrierIngressClient::new(with(secret));
        all_refused!(
            what,
            client,
            Code::Unauthenticated,
            [
                upsert_contracts,
                register_users,
                unregister_users,
                put_profile,
                describe_enterprises,
            ]
        );
    }
    // Admin: only the admin token.
    for (what, secret) in [
        ("no credential", ""),
        ("an enterprise key", shop_key.as_str()),
        ("a carrier token", alpha_token.as_str()),
        ("the deliver token", DELIVER_TOKEN),
    ] {
        let client = pb::admin_client::AdminClient::new(with(secret));
        all_refused!(
            what,
            client,
            Code::Unauthenticated,
            [
                create_enterprise,
                create_service,
                register_carrier,
                get_carrier_stats,
                explain_delivery,
                get_stats,
                reconcile,
                set_rate_card,
                get_prices,
                get_revenue,
                get_statement,
                open_auction_slot,
                list_auction_slots,
                issue_api_key,
                revoke_api_key,
                list_api_keys,
                verify_audit_log,
                list_audit_log,
            ]
        );
    }
    // A carrier's own services: CarrierAdmin only its admin token, Deliver only the relay's token.
    let carrier = channel(&hub.carriers[0].url()).await;
    for (what, secret) in [
        ("no credential", ""),
        ("an enterprise key", shop_key.as_str()),
        ("its relay token", DELIVER_TOKEN),
        ("the relay's admin token", ADMIN_TOKEN),
    ] {
        let client = cpb::carrier_admin_client::CarrierAdminClient::new(InterceptedService::new(
            carrier.clone(),
            BearerInterceptor::new(secret).unwrap(),
        ));
        all_refused!(
            what,
            client,
            Code::Unauthenticated,
            [provision_subscribers, get_counts]
        );
    }
    for secret in [
        "",
        CARRIER_ADMIN_TOKEN,
        shop_key.as_str(),
        alpha_token.as_str(),
    ] {
        let mut client = cpb::carrier_client::CarrierClient::new(InterceptedService::new(
            carrier.clone(),
            BearerInterceptor::new(secret).unwrap(),
        ));
        let (_tx, rx) = tokio::sync::mpsc::channel::<cpb::RelayToCarrier>(1);
        let (code, _) = refusal(
            client
                .deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await,
        );
        assert_eq!(code, Code::Unauthenticated);
    }

    // Another enterprise with shop's ids: the same refusal as for ids that do not exist.
    let mut rival = hub.enterprise(&rival_key).await.unwrap();
    let same = |theirs: (Code, String), none: (Code, String)| {
        assert_eq!(
            theirs, none,
            "another tenant's id must look like no id at all"
        );
        assert_eq!(theirs.0, Code::NotFound, "{theirs:?}");
    };
    let get = |id: &str| pb::GetMessageRequest {
        message_id: id.into(),
    };
    same(
        refusal(rival.get_message(get(&message.message_id)).await),
        refusal(
            rival
                .get_message(get("msg_0000000000000000000000000000000"))
                .await,
        ),
    );
    let explain = |message_id: &str, user_ref: &str| pb::ExplainDeliveryRequest {
        message_id: message_id.into(),
        user_ref: user_ref.into(),
    };
    same(
        refusal(
            rival
                .explain_delivery(explain(&message.message_id, &shop_ref))
                .await,
        ),
        refusal(
            rival
                .explain_delivery(explain("msg_0000000000000000000000000000000", &shop_ref))
                .await,
        ),
    );
    let to_refs = |key: &str, user_ref: &str| {
        send_request(
            key,
            pb::target::Kind::Refs(pb::RefList {
                refs: vec![user_ref.into()],
            }),
            "hi",
            common::Channel::Sms,
        )
    };
    same(
        refusal(rival.send_message(to_refs("a", &shop_ref)).await),
        refusal(
            rival
                .send_message(to_refs("b", "r000000000000000000000000"))
                .await,
        ),
    );
    same(
        refusal(rival.quote_message(to_refs("c", &shop_ref)).await),
        refusal(
            rival
                .quote_message(to_refs("d", "r000000000000000000000000"))
                .await,
        ),
    );
    let to_service = |key: &str, service: &str| {
        send_request(
            key,
            pb::target::Kind::ServiceId(service.into()),
            "hi",
            common::Channel::Sms,
        )
    };
    same(
        refusal(rival.send_message(to_service("e", &service)).await),
        refusal(
            rival
                .send_message(to_service("f", "svc_000000000000000000000000"))
                .await,
        ),
    );
    let get_bid = |id: &str| pb::GetBidRequest { bid_id: id.into() };
    same(
        refusal(rival.get_bid(get_bid(&bid.bid_id)).await),
        refusal(
            rival
                .get_bid(get_bid("bid_0000000000000000000000000000000"))
                .await,
        ),
    );
    // Another enterprise's webhook endpoint does not exist for the rival.
    let unknown = "whe_0000000000000000000000000000000";
    macro_rules! same_for_webhook {
        ($rpc:ident, $request:ident $(, $field:ident: $value:expr)*) => {
            same(
                refusal(rival.$rpc(pb::$request { webhook_id: webhook.webhook_id.clone() $(, $field: $value)* }).await),
                refusal(rival.$rpc(pb::$request { webhook_id: unknown.into() $(, $field: $value)* }).await),
            );
        };
    }
    same_for_webhook!(rotate_webhook_secret, RotateWebhookSecretRequest, previous_valid_for: None);
    same_for_webhook!(remove_webhook, RemoveWebhookRequest);
    same_for_webhook!(resume_webhook, ResumeWebhookRequest);
    same_for_webhook!(list_webhook_attempts, ListWebhookAttemptsRequest);
    let theirs = rival
        .list_webhooks(pb::ListWebhooksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.webhooks.is_empty(), "{theirs:?}");

    // Lists and sums see only the caller's own.
    let listed = rival
        .list_registrations(pb::ListRegistrationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.registrations.is_empty());
    let registrations = rival
        .list_registrations(pb::ListRegistrationsRequest {
            service_id: service.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(registrations.registrations.is_empty());

    // A carrier cannot speak for another carrier's subscriber.
    let mut beta =
        pb::carrier_ingress_client::CarrierIngressClient::new(with(&hub.carriers[1].token));
    let (code, field) = refusal(
        beta.register_users(pb::RegisterUsersRequest {
            registrations: vec![pb::UserRegistration {
                user_id: user_id.clone(),
                enterprise_id: shop.clone(),
                text_version: "v1".into(),
                ..Default::default()
            }],
        })
        .await,
    );
    assert_eq!(
        (code, field.starts_with("registrations[0].user_id")),
        (Code::NotFound, true)
    );
    let (code, _) = refusal(
        beta.put_profile(pb::PutProfileRequest {
            user_id: user_id.clone(),
            enterprise_id: shop.clone(),
            profile: None,
            text_version: "v1".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);
    let removed = beta
        .unregister_users(pb::UnregisterUsersRequest {
            unregistrations: vec![pb::UserUnregistration {
                user_id: user_id.clone(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 0, "beta erased alpha's subscriber");
    assert!(
        shop_client
            .list_registrations(pb::ListRegistrationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .registrations
            .iter()
            .any(|r| r.user_ref == shop_ref)
    );
    hub.stop_fleet().await.unwrap();
    hub.shutdown().await.unwrap();
}

backend_tests!(wrong_roles_and_wrong_tenants_are_refused_alike);
