//! Pricing, billing and the capacity auction, on SQLite and PostgreSQL:
//! charges come from deduplicated events (a fan-out once, nothing
//! undelivered), quotes equal charges, statements equal the ledger, both
//! auction rules allocate as worked by hand, concurrent bids and sends never
//! oversell, and bad input is refused naming the field.

use std::collections::{HashMap, HashSet};

use chukei_proto::clock::to_timestamp;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use integration_tests::scene::*;
use integration_tests::{Backend, Enterprise, backend_tests, eventually, store};
use relay_svc::auction::{self, BidState, NewSlot, Rule};
use relay_svc::policy::{AttentionConfig, Policy, Priority, Timing};
use relay_svc::pricing::{PRICED_CHANNELS, Prices, RateCard, RateEntry};
use relay_svc::receipts::{EventKind, Receipt};
use relay_svc::registry::{Contract, NewRegistration, Profile};
use relay_svc::storage::{LedgerDimension, Store};
use relay_svc::targeting::{Channel, Content, NewMessage, Target};
use tonic::Code;

/// Every channel 2 yen delivered / 1 opened, except SMS: 09:00–10:00 Tokyo
/// 7 / 3, the other hours 5 / 2.
fn rate_card() -> pb::SetRateCardRequest {
    let entry =
        |channel: common::Channel, from_hour, to_hour, delivered, opened| pb::RateCardEntry {
            channel: channel as i32,
            from_hour,
            to_hour,
            delivered_price: delivered,
            opened_price: opened,
        };
    pb::SetRateCardRequest {
        entries: vec![
            entry(common::Channel::Rcs, 0, 0, 2, 1),
            entry(common::Channel::Sns, 0, 0, 2, 1),
            entry(common::Channel::Email, 0, 0, 2, 1),
            entry(common::Channel::Sms, 9, 10, 7, 3),
            entry(common::Channel::Sms, 10, 9, 5, 2),
        ],
        zone: "Asia/Tokyo".into(),
        dynamic: None,
    }
}

fn sms(mut request: pb::SendMessageRequest) -> pb::SendMessageRequest {
    request.channel = common::Channel::Sms as i32;
    request
}

fn refs(
    scene: &Scene,
    enterprise: usize,
    people: impl IntoIterator<Item = usize>,
) -> pb::target::Kind {
    pb::target::Kind::Refs(pb::RefList {
        refs: people
            .into_iter()
            .map(|i| scene.ref_of(enterprise, i))
            .collect(),
    })
}

async fn charged(scene: &Scene, enterprise: usize, message_id: &str, yen: i64) {
    let what = format!("{message_id} charged {yen} yen");
    eventually(&what, WAIT, || async {
        (scene.status(enterprise, message_id).await.charged == yen).then_some(())
    })
    .await;
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, field: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}: ")),
        "error should name {field}: {status:?}"
    );
}

async fn quote_charge_statement_and_revenue_agree(backend: Backend) {
    let Some(scene) = scene(
        backend,
        Setup {
            users: 12,
            carriers: &["alpha", "beta"],
            ..half_open()
        },
    )
    .await
    else {
        return;
    };
    let n = scene.fleet.users.len() as u64;
    let two_carriers: Vec<usize> = (0..n as usize)
        .filter(|&i| scene.fleet.users[i].carriers.len() > 1)
        .collect();
    assert!(
        !two_carriers.is_empty(),
        "some people must have two carriers"
    );
    let mut admin = scene.hub.admin().await.unwrap();
    let mut client = scene.client(0);

    // Nothing is charged before there is a rate card; the table is published.
    let before = client
        .get_prices(pb::GetPricesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.version, 0);
    let mut gap = rate_card();
    gap.entries.pop();
    let refused = admin
        .set_rate_card(gap)
        .await
        .expect_err("SMS 10:00-09:00 is unpriced");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "entries: SMS 00:00-01:00 has no price: every channel needs every hour"
    );
    let mut negative = rate_card();
    negative.entries[1].opened_price = -1;
    assert_refused(
        admin.set_rate_card(negative).await,
        Code::InvalidArgument,
        "entries[1].opened_price",
    );
    let table = admin.set_rate_card(rate_card()).await.unwrap().into_inner();
    assert_eq!((table.version, table.cells.len()), (1, 96));
    let prices = client
        .get_prices(pb::GetPricesRequest {})
        .await
        .unwrap()
        .into_inner();
    let cell = |slot: u32| {
        prices
            .cells
            .iter()
            .find(|c| c.channel == common::Channel::Sms as i32 && c.slot == slot)
            .map(|c| (c.delivered_price, c.opened_price))
    };
    assert_eq!(
        (prices.version, cell(9), cell(10)),
        (1, Some((7, 3)), Some((5, 2)))
    );

    // Handed to the carriers but expired there undelivered: never charged.
    let now = scene.clock.now_ms();
    let mut held = sms(everyone("expired", "too late"));
    held.window = Some(common::DeliveryWindow {
        kind: Some(common::delivery_window::Kind::Absolute(
            common::AbsoluteWindow {
                start: Some(to_timestamp(now + 2 * HOUR_MS)),
                end: Some(to_timestamp(now + 3 * HOUR_MS)),
            },
        )),
    });
    held.window_mode = pb::WindowMode::AtCarrier as i32;
    held.expires_at = Some(to_timestamp(now + HOUR_MS));
    let expired = scene.send(0, held).await;
    scene.wait(0, &expired, |s| s.handed_over == n).await;
    scene.advance(61 * MINUTE_MS);
    scene.wait(0, &expired, |s| s.expired == n).await;

    // 10:01 in Tokyo: SMS costs 5 delivered, 2 opened. The quote of a
    // broadcast over every carrier is one charge per person.
    let fanout = sms(pb::SendMessageRequest {
        all_carriers: true,
        ..everyone("fanout", "one per person")
    });
    let quote = client
        .quote_message(fanout.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (quote.recipients, quote.price_table, quote.zone.as_str()),
        (n, 1, "Asia/Tokyo")
    );
    assert_eq!(quote.lines.len(), 1);
    assert_eq!(
        (quote.lines[0].slot, quote.lines[0].delivered_price),
        (10, 5)
    );
    assert_eq!(
        (quote.delivered_low, quote.delivered_high),
        (5 * n as i64, 5 * n as i64)
    );
    assert_eq!(
        (quote.opened_low, quote.opened_high),
        (2 * n as i64, 2 * n as i64)
    );
    let fanout = scene.send(0, fanout).await;
    scene.wait(0, &fanout, |s| s.delivered == n).await;
    for &i in &two_carriers {
        let carriers: HashSet<String> = scene
            .items(i, &fanout)
            .into_iter()
            .map(|m| m.carrier_id)
            .collect();
        assert_eq!(carriers.len(), 2, "person {i} is reached on both carriers");
    }
    scene.advance(61 * MINUTE_MS);
    scene.wait(0, &fanout, |s| s.opened == n / 2).await;
    let fanout_yen = 5 * n as i64 + 2 * (n / 2) as i64;
    charged(&scene, 0, &fanout, fanout_yen).await;
    assert_eq!(scene.status(0, &expired).await.charged, 0);

    // Quote equals the charge when nothing changes in between: the openers, at 11:02.
    let openers = sms(request(
        "openers",
        refs(&scene, 0, (0..n as usize).step_by(2)),
        "for you",
    ));
    let quote = client
        .quote_message(openers.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quote.delivered_low, quote.delivered_high);
    let openers = scene.send(0, openers).await;
    scene.wait(0, &openers, |s| s.delivered == n / 2).await;
    scene.advance(61 * MINUTE_MS);
    scene.wait(0, &openers, |s| s.opened == n / 2).await;
    let quoted = quote.delivered_high + quote.opened_high;
    charged(&scene, 0, &openers, quoted).await;

    // The statement: its lines sum to its total, which is the ledger's.
    let statement = client
        .get_statement(pb::GetStatementRequest {
            month: "2026-11".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let total = fanout_yen + quoted;
    assert_eq!(statement.total, total);
    assert_eq!(statement.lines.iter().map(|l| l.amount).sum::<i64>(), total);
    let lines: HashSet<(String, Option<u32>, i64, i64)> = statement
        .lines
        .iter()
        .map(|l| (l.kind.clone(), l.slot, l.quantity, l.unit_price))
        .collect();
    let half = (n / 2) as i64;
    let expected: HashSet<(String, Option<u32>, i64, i64)> = [
        ("delivered".to_owned(), Some(10), n as i64, 5),
        ("opened".to_owned(), Some(10), half, 2),
        ("delivered".to_owned(), Some(11), half, 5),
        ("opened".to_owned(), Some(11), half, 2),
    ]
    .into();
    assert_eq!(lines, expected);
    let next_month = client
        .get_statement(pb::GetStatementRequest {
            month: "2026-12".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((next_month.total, next_month.lines.len()), (0, 0));
    assert_refused(
        client
            .get_statement(pb::GetStatementRequest {
                month: "2026-13".into(),
            })
            .await,
        Code::InvalidArgument,
        "month",
    );

    // The operator: revenue by carrier and by enterprise is the same money.
    let by_carrier = admin
        .get_revenue(pb::GetRevenueRequest {
            month: "2026-11".into(),
            by: vec![pb::RevenueDimension::Carrier as i32],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_carrier.total, total);
    assert_eq!(by_carrier.rows.iter().map(|r| r.amount).sum::<i64>(), total);
    assert!(
        by_carrier
            .rows
            .iter()
            .all(|r| ["alpha", "beta"].contains(&r.key[0].as_str()))
    );
    let statement_for_operator = admin
        .get_statement(pb::AdminGetStatementRequest {
            enterprise_id: scene.enterprises[0].0.clone(),
            month: "2026-11".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement_for_operator, statement);

    // The same through the CLI.
    let cli = |command| enterprise_cli::Cli {
        relay_url: scene.hub.relay_url(),
        tls_ca: None,
        api_key: Some(scene.enterprises[0].1.clone()),
        json: false,
        command,
    };
    let mut out = Vec::new();
    enterprise_cli::run(
        cli(enterprise_cli::Command::Billing(
            enterprise_cli::cmd::billing::Billing {
                month: "2026-11".into(),
            },
        )),
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("total") && last.ends_with(&total.to_string()),
        "{text}"
    );
}

async fn an_auction_sells_scarce_capacity(backend: Backend) {
    let Some(scene) = scene(
        backend,
        Setup {
            users: 8,
            enterprises: 2,
            ..Setup::default()
        },
    )
    .await
    else {
        return;
    };
    let mut admin = scene.hub.admin().await.unwrap();
    admin.set_rate_card(rate_card()).await.unwrap();
    let (mut first, mut second) = (scene.client(0), scene.client(1));
    let now = scene.clock.now_ms();
    // SMS 11:00–13:00 Tokyo, 6 messages, bids close at 10:00, reserve 3, uniform price.
    let open = pb::OpenAuctionSlotRequest {
        channel: common::Channel::Sms as i32,
        starts_at: Some(to_timestamp(now + 2 * HOUR_MS)),
        ends_at: Some(to_timestamp(now + 4 * HOUR_MS)),
        capacity: 6,
        closes_at: Some(to_timestamp(now + HOUR_MS)),
        reserve_price: 3,
        rule: pb::PricingRule::Uniform as i32,
    };
    for (bad, field) in [
        (
            pb::OpenAuctionSlotRequest {
                capacity: 0,
                ..open
            },
            "capacity",
        ),
        (
            pb::OpenAuctionSlotRequest {
                closes_at: Some(to_timestamp(now + 3 * HOUR_MS)),
                ..open
            },
            "closes_at",
        ),
        (pb::OpenAuctionSlotRequest { rule: 0, ..open }, "rule"),
        (pb::OpenAuctionSlotRequest { channel: 0, ..open }, "channel"),
        (
            pb::OpenAuctionSlotRequest {
                reserve_price: -1,
                ..open
            },
            "reserve_price",
        ),
    ] {
        assert_refused(
            admin.open_auction_slot(bad).await,
            Code::InvalidArgument,
            field,
        );
    }
    let slot = admin.open_auction_slot(open).await.unwrap().into_inner();
    assert_refused(
        admin.open_auction_slot(open).await,
        Code::AlreadyExists,
        "starts_at",
    );

    let bid = |slot_id: &str, quantity, price| pb::PlaceBidRequest {
        slot_id: slot_id.into(),
        quantity,
        price,
    };
    let won = first
        .place_bid(bid(&slot.slot_id, 4, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(won.state, pb::BidState::Sealed as i32);
    let partial = second
        .place_bid(bid(&slot.slot_id, 4, 8))
        .await
        .unwrap()
        .into_inner();
    for (bad, code, field) in [
        (bid(&slot.slot_id, 4, 0), Code::InvalidArgument, "price"),
        (bid(&slot.slot_id, 0, 5), Code::InvalidArgument, "quantity"),
        (bid(&slot.slot_id, 4, 2), Code::InvalidArgument, "price"),
        (bid(&slot.slot_id, 7, 5), Code::InvalidArgument, "quantity"),
        (bid("slot_nope", 4, 5), Code::NotFound, "slot_id"),
    ] {
        assert_refused(second.place_bid(bad).await, code, field);
    }
    let with_bid = |key: &str, people: std::ops::Range<usize>, enterprise: usize, bid_id: &str| {
        pb::SendMessageRequest {
            bid_id: bid_id.into(),
            ..request(key, refs(&scene, enterprise, people), "prime time")
        }
    };
    // Before the close the bid has not won anything.
    assert_refused(
        first
            .send_message(with_bid("early", 0..2, 0, &won.bid_id))
            .await,
        Code::FailedPrecondition,
        "bid_id",
    );
    // Without a bid, the slot's hours are not for sale on SMS; before them they are.
    let mut in_slot = sms(everyone("in-slot", "no bid"));
    in_slot.window = Some(common::DeliveryWindow {
        kind: Some(common::delivery_window::Kind::Absolute(
            common::AbsoluteWindow {
                start: Some(to_timestamp(now + 150 * MINUTE_MS)),
                end: Some(to_timestamp(now + 160 * MINUTE_MS)),
            },
        )),
    });
    let refused = first
        .send_message(in_slot)
        .await
        .expect_err("sold by auction");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("sold by auction"), "{refused:?}");
    first
        .send_message(sms(everyone("before", "fine")))
        .await
        .unwrap();

    // The close, on the clock: 6 messages at the uniform price of the
    // highest unfilled bid (the second's last 2 at 8).
    scene.advance(61 * MINUTE_MS);
    let bid_of = |client: &Enterprise, bid_id: String| {
        let mut client = client.clone();
        async move {
            client
                .get_bid(pb::GetBidRequest { bid_id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    eventually("the auction closes", WAIT, || async {
        let bid = bid_of(&first, won.bid_id.clone()).await;
        (bid.state == pb::BidState::Won as i32).then_some(())
    })
    .await;
    let won = bid_of(&first, won.bid_id.clone()).await;
    let partial = bid_of(&second, partial.bid_id.clone()).await;
    assert_eq!((won.awarded, won.pays), (4, 8));
    assert_eq!(
        (partial.state, partial.awarded, partial.pays),
        (pb::BidState::Won as i32, 2, 8)
    );
    let slots = first
        .list_auction_slots(pb::ListAuctionSlotsRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed = slots
        .slots
        .iter()
        .find(|s| s.slot_id == slot.slot_id)
        .unwrap();
    assert_eq!(
        (
            listed.closed,
            listed.awarded,
            listed.clearing_price,
            listed.bids
        ),
        (true, 6, Some(8), 0)
    );
    assert_refused(
        second.place_bid(bid(&slot.slot_id, 1, 20)).await,
        Code::FailedPrecondition,
        "slot_id",
    );

    // Sends draw on the capacity won, never more; another's bid is not found.
    assert_refused(
        second
            .send_message(with_bid("too-many", 0..3, 1, &partial.bid_id))
            .await,
        Code::ResourceExhausted,
        "bid_id",
    );
    assert_refused(
        second
            .send_message(with_bid("not-mine", 0..1, 1, &won.bid_id))
            .await,
        Code::NotFound,
        "bid_id",
    );
    let quote = first
        .quote_message(with_bid("prime", 0..4, 0, &won.bid_id))
        .await
        .unwrap()
        .into_inner();
    assert!(quote.prepaid && quote.delivered_high == 0, "{quote:?}");
    assert_eq!(
        quote.lines.iter().map(|l| l.slot).collect::<Vec<_>>(),
        vec![11, 12]
    );
    let prime = scene.send(0, with_bid("prime", 0..4, 0, &won.bid_id)).await;
    let replayed = scene.send(0, with_bid("prime", 0..4, 0, &won.bid_id)).await;
    assert_eq!(prime, replayed, "a retry does not draw twice");
    assert_refused(
        first
            .send_message(with_bid("redeemed-out", 4..5, 0, &won.bid_id))
            .await,
        Code::ResourceExhausted,
        "bid_id",
    );
    let drawn = bid_of(&first, won.bid_id.clone()).await;
    assert_eq!(drawn.used, 4);

    // Held until the slot opens, then delivered on its channel.
    settle().await;
    assert!(scene.items(0, &prime).is_empty(), "not before the slot");
    scene.advance(61 * MINUTE_MS);
    scene.wait(0, &prime, |s| s.delivered == 4).await;
    for i in 0..4 {
        assert_eq!(
            scene.items(i, &prime)[0].channel,
            common::Channel::Sms as i32
        );
    }
    scene.advance(61 * MINUTE_MS);
    scene.wait(0, &prime, |s| s.opened == 4).await;
    // Deliveries were paid for by the award; opens at the 11:00 SMS price.
    charged(&scene, 0, &prime, 4 * 2).await;
    let statement = first
        .get_statement(pb::GetStatementRequest {
            month: "2026-11".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let award = statement.lines.iter().find(|l| l.kind == "award").unwrap();
    assert_eq!(
        (award.quantity, award.unit_price, award.amount, award.slot),
        (4, 8, 32, None)
    );
    assert!(
        !statement
            .lines
            .iter()
            .any(|l| l.kind == "delivered" && l.unit_price == 0)
    );
    assert_eq!(
        statement.total,
        statement.lines.iter().map(|l| l.amount).sum::<i64>()
    );

    // After the slot, the bid is spent.
    scene.advance(2 * HOUR_MS);
    assert_refused(
        second
            .send_message(with_bid("late", 0..1, 1, &partial.bid_id))
            .await,
        Code::FailedPrecondition,
        "bid_id",
    );
}

/// One enterprise per name, each with users u1–u3 on carrier c1 (u1 also on c2).
async fn seed(store: &Store, enterprises: &[&str]) -> HashMap<String, Vec<String>> {
    for carrier in ["c1", "c2"] {
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
    let contract = |user: &str, primary| Contract {
        user_id: user.into(),
        primary,
        active: true,
    };
    let users = ["u1", "u2", "u3"];
    store
        .upsert_contracts("c1", &users.map(|u| contract(u, true)), 0)
        .await
        .unwrap();
    store
        .upsert_contracts("c2", &[contract("u1", false)], 0)
        .await
        .unwrap();
    let mut refs = HashMap::new();
    for enterprise in enterprises {
        store
            .create_enterprise(enterprise, enterprise, &format!("hash-{enterprise}"), 0)
            .await
            .unwrap();
        let registrations: Vec<NewRegistration> = users
            .iter()
            .map(|user| NewRegistration {
                user_id: (*user).into(),
                enterprise_id: (*enterprise).into(),
                service_id: None,
                profile: Profile::default(),
                text_version: "v1".into(),
            })
            .collect();
        refs.insert(
            (*enterprise).to_owned(),
            store.register_users("c1", &registrations, 0).await.unwrap(),
        );
    }
    refs
}

fn message(key: &str, refs: Vec<String>, bid_id: Option<&str>) -> NewMessage {
    NewMessage {
        idempotency_key: key.into(),
        target: Target::Refs(refs),
        content: Content {
            text: "hi".into(),
            ..Content::default()
        },
        policy: Policy::fixed(Some(Channel::Sms)),
        all_carriers: true,
        timing: Timing::default(),
        follow_up: None,
        priority: Priority::Normal,
        bid_id: bid_id.map(str::to_owned),
        trace_parent: String::new(),
    }
}

fn card() -> RateCard {
    let entries: Vec<RateEntry> = PRICED_CHANNELS
        .iter()
        .map(|&channel| RateEntry {
            channel,
            from_hour: 0,
            to_hour: 0,
            prices: Prices {
                delivered: if channel == Channel::Sms { 7 } else { 1 },
                opened: 3,
            },
        })
        .collect();
    RateCard::new(&entries, None).unwrap()
}

fn receipt(message_id: &str, user_id: &str, kind: EventKind) -> Receipt {
    Receipt {
        delivery_id: None,
        message_id: message_id.into(),
        user_id: user_id.into(),
        kind,
        channel: Some(Channel::Sms),
        at: 1_000,
        region: "tokyo".into(),
    }
}

async fn fold(store: &Store) {
    store.roll_up_all(1_000, 5_000).await.unwrap();
}

async fn the_ledger_charges_deduplicated_events_once(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let refs = seed(store, &["ent_1"]).await.remove("ent_1").unwrap();
    store.set_rate_card(&card(), "Asia/Tokyo", 0).await.unwrap();
    let attention = AttentionConfig::default();
    for (id, key) in [("msg_1", "k1"), ("msg_2", "k2")] {
        store
            .accept_message(
                "ent_1",
                id,
                &message(key, refs.clone(), None),
                0,
                10_000,
                &attention,
            )
            .await
            .unwrap();
        for carrier in ["c1", "c2"] {
            let due = store.due_deliveries(carrier, 0, 0, 100).await.unwrap();
            let ids: Vec<i64> = due
                .iter()
                .filter(|d| d.message_id == id)
                .map(|d| d.id)
                .collect();
            store.mark_handed_over(&ids, 5).await.unwrap();
        }
    }
    // msg_1: u1 delivered and opened, reported by both its carriers (twice);
    // u2 delivered; u3 never. msg_2: handed over, never delivered.
    for carrier in ["c1", "c2", "c1"] {
        store
            .record_receipts(
                carrier,
                &[
                    receipt("msg_1", "u1", EventKind::Delivered),
                    receipt("msg_1", "u1", EventKind::Opened),
                ],
                0,
            )
            .await
            .unwrap();
    }
    store
        .record_receipts("c1", &[receipt("msg_1", "u2", EventKind::Delivered)], 0)
        .await
        .unwrap();
    fold(store).await;
    assert_eq!(store.message_charges("msg_1").await.unwrap(), 2 * 7 + 3);
    assert_eq!(store.message_charges("msg_2").await.unwrap(), 0);
    // Folding again (nothing queued) charges nothing more.
    fold(store).await;
    let by_kind = store
        .ledger_sums(Some("ent_1"), 0, 86_400_000, &[LedgerDimension::Kind])
        .await
        .unwrap();
    let sums: Vec<(String, i64, i64)> = by_kind
        .into_iter()
        .map(|s| (s.key[0].clone(), s.quantity, s.amount))
        .collect();
    assert_eq!(
        sums,
        vec![("delivered".into(), 2, 14), ("opened".into(), 1, 3)]
    );
    let total = store
        .ledger_sums(Some("ent_1"), 0, 86_400_000, &[])
        .await
        .unwrap();
    assert_eq!(total[0].amount, 17);

    // The ledger is append-only on either backend.
    let tampered = integration_tests::sql_execute(store, "UPDATE ledger SET amount = 0").await;
    assert!(tampered.is_err(), "updating the ledger must fail");
    let deleted = integration_tests::sql_execute(store, "DELETE FROM ledger").await;
    assert!(deleted.is_err(), "deleting from the ledger must fail");
    assert_eq!(store.message_charges("msg_1").await.unwrap(), 17);

    // Dynamic prices follow each slot's open rate against its channel's.
    // So far SMS at 09:00 Tokyo: 2 delivered, 1 opened. A send at 14:00: 1 delivered, unopened.
    let five = 5 * 3_600_000;
    store
        .accept_message(
            "ent_1",
            "msg_3",
            &message("k3", refs[..1].to_vec(), None),
            five,
            five + 10_000,
            &attention,
        )
        .await
        .unwrap();
    let due = store.due_deliveries("c1", five, 0, 100).await.unwrap();
    let ids: Vec<i64> = due
        .iter()
        .filter(|d| d.message_id == "msg_3")
        .map(|d| d.id)
        .collect();
    store.mark_handed_over(&ids, five).await.unwrap();
    let later = Receipt {
        at: five + 1_000,
        ..receipt("msg_3", "u1", EventKind::Delivered)
    };
    store.record_receipts("c1", &[later], five).await.unwrap();
    fold(store).await;
    let dynamic = RateCard {
        dynamic: Some(relay_svc::pricing::Dynamic {
            floor_percent: 50,
            ceiling_percent: 200,
            min_deliveries: 1,
        }),
        ..card()
    };
    let table = store
        .set_rate_card(&dynamic, "Asia/Tokyo", five + 60_000)
        .await
        .unwrap();
    let sms = relay_svc::pricing::channel_index(Some(Channel::Sms));
    // 09:00: rate 1/2 against 1/3 → ×1.5: 7 → 10.5 → 11, opened 3 → 4.5 → 5.
    assert_eq!(
        table.prices[sms][9],
        Prices {
            delivered: 11,
            opened: 5
        }
    );
    assert_eq!(table.rates[sms][9], Some(500));
    // 14:00: nothing opened → the floor, half the base.
    assert_eq!(
        table.prices[sms][14],
        Prices {
            delivered: 4,
            opened: 2
        }
    );
    // 10:00: no evidence → the base.
    assert_eq!(
        table.prices[sms][10],
        Prices {
            delivered: 7,
            opened: 3
        }
    );
    // Not due yet; then due but nothing moved; a new open at 14:00 moves it.
    assert_eq!(
        store
            .reprice_if_due(five + 120_000, 3_600_000)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .reprice_if_due(five + 3_700_000, 3_600_000)
            .await
            .unwrap(),
        None
    );
    let opened = Receipt {
        at: five + 2_000,
        ..receipt("msg_3", "u1", EventKind::Opened)
    };
    store.record_receipts("c1", &[opened], five).await.unwrap();
    fold(store).await;
    let moved = store
        .reprice_if_due(five + 7_400_000, 3_600_000)
        .await
        .unwrap();
    assert_eq!(moved, Some(table.id + 1));
    let current = store.price_table(None).await.unwrap().unwrap();
    assert_eq!(current.rates[sms][14], Some(1000));
    // 14:00 now opens 1/1 against the channel's 2/3: ×1.5 → 11.
    assert_eq!(current.prices[sms][14].delivered, 11);
    fixture.close().await;
}

async fn concurrent_bids_and_sends_never_oversell(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    let enterprises = ["e1", "e2", "e3", "e4"];
    let refs = seed(store, &enterprises).await;
    let attention = AttentionConfig::default();
    let mut rng = chukei_proto::rng::Rng::for_labels(7, &["market", "interleavings"]);
    for round in 0..10_i64 {
        // A slot whose bidding closes while bids are arriving.
        let base = round * 10 * 3_600_000;
        let slot_id = format!("slot_{round}");
        let capacity = 3 + rng.below(8) as i64;
        let rule = if round % 2 == 0 {
            Rule::PayAsBid
        } else {
            Rule::Uniform
        };
        let slot = NewSlot {
            channel: Channel::Sms,
            starts_at: base + 2 * 3_600_000,
            ends_at: base + 3 * 3_600_000,
            capacity,
            closes_at: base + 3_600_000,
            reserve: 2,
            rule,
        };
        store.open_slot(&slot_id, &slot, base).await.unwrap();
        let mut tasks = Vec::new();
        for index in 0..12 {
            let store = store.clone();
            let slot_id = slot_id.clone();
            let enterprise = enterprises[index % enterprises.len()];
            let (quantity, price, yields) = (
                1 + rng.below(4) as i64,
                2 + rng.below(6) as i64,
                rng.below(20),
            );
            tasks.push(tokio::spawn(async move {
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                let bid_id = format!("{slot_id}_bid_{index}");
                let placed = store
                    .place_bid(enterprise, &bid_id, &slot_id, quantity, price, base + 10)
                    .await;
                placed.ok().map(|bid| (enterprise, bid))
            }));
        }
        let closer = {
            let store = store.clone();
            let yields = rng.below(20);
            tokio::spawn(async move {
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                store.close_due_slots(base + 3_600_000).await.unwrap()
            })
        };
        let mut placed = Vec::new();
        for task in tasks {
            placed.extend(task.await.unwrap());
        }
        closer.await.unwrap();
        store.close_due_slots(base + 3_600_000).await.unwrap();

        // Every accepted bid took part in the close, exactly as allocated.
        let mut outcomes = Vec::new();
        for (enterprise, bid) in &placed {
            let now = store.bid(enterprise, &bid.bid_id).await.unwrap().unwrap();
            assert_ne!(
                now.state,
                BidState::Sealed,
                "round {round}: a bid was accepted after the close"
            );
            outcomes.push((*enterprise, now));
        }
        let sealed: Vec<auction::SealedBid> = outcomes
            .iter()
            .map(|(_, b)| auction::SealedBid {
                bid_id: b.bid_id.clone(),
                seq: 0,
                quantity: b.quantity,
                price: b.price,
            })
            .collect();
        let awarded: i64 = outcomes.iter().map(|(_, b)| b.awarded).sum();
        assert!(awarded <= capacity, "round {round}: oversold at the close");
        let by_price: i64 = auction::allocate(&sealed, capacity, 2, rule).awarded;
        assert_eq!(awarded, by_price, "round {round}");

        // Concurrent sends on every winning bid never draw more than it won.
        let mut sends = Vec::new();
        for (enterprise, bid) in outcomes.iter().filter(|(_, b)| b.state == BidState::Won) {
            for attempt in 0..4 {
                let store = store.clone();
                let bid = bid.clone();
                let enterprise = *enterprise;
                let people = 1 + rng.below(3) as usize;
                let recipients: Vec<String> = refs[enterprise][..people].to_vec();
                let yields = rng.below(10);
                sends.push(tokio::spawn(async move {
                    for _ in 0..yields {
                        tokio::task::yield_now().await;
                    }
                    let key = format!("{}_{attempt}", bid.bid_id);
                    let message = message(&key, recipients, Some(&bid.bid_id));
                    let now = base + 90 * 60_000;
                    let terms = auction::terms_for_bid(&message, Some(&bid), now).unwrap();
                    let accepted = store
                        .accept_on_terms(
                            enterprise,
                            &key,
                            &message,
                            now,
                            now + 86_400_000,
                            &attention,
                            &terms,
                            0,
                        )
                        .await;
                    match accepted {
                        Ok(stored) => {
                            Some((bid.bid_id.clone(), stored.row.matched.unwrap() as i64))
                        }
                        Err(relay_svc::error::Error::ResourceExhausted { .. }) => None,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }));
            }
        }
        let mut drawn: HashMap<String, i64> = HashMap::new();
        for send in sends {
            if let Some((bid_id, recipients)) = send.await.unwrap() {
                *drawn.entry(bid_id).or_default() += recipients;
            }
        }
        for (enterprise, bid) in &outcomes {
            let now = store.bid(enterprise, &bid.bid_id).await.unwrap().unwrap();
            let sent = drawn.get(&bid.bid_id).copied().unwrap_or(0);
            assert!(
                now.used <= now.awarded,
                "round {round}: {} overdrawn",
                bid.bid_id
            );
            assert_eq!(
                now.used, sent,
                "round {round}: drawn equals what the accepted messages carry"
            );
        }
    }
    fixture.close().await;
}

/// `count` more people (beside `seed`'s) on carrier c1, registered with
/// ent_1, and a campaign `msg_c` to everyone registered, accepted but not
/// yet expanded.
async fn campaign_to_everyone(store: &Store, count: usize) {
    seed(store, &["ent_1"]).await;
    let people: Vec<String> = (0..count).map(|i| format!("p{i:03}")).collect();
    integration_tests::contract_and_register(store, "c1", "ent_1", &people, 0)
        .await
        .unwrap();
    store.set_rate_card(&card(), "Asia/Tokyo", 0).await.unwrap();
    let campaign = NewMessage {
        target: Target::AllRegistered,
        all_carriers: false,
        ..message("campaign", Vec::new(), None)
    };
    store
        .accept_message(
            "ent_1",
            "msg_c",
            &campaign,
            0,
            86_400_000,
            &AttentionConfig::default(),
        )
        .await
        .unwrap();
}

/// The delivered and opened counts in the time cube.
async fn cube_counts(store: &Store) -> (i64, i64) {
    const SUMS: &str = "SELECT CAST(COALESCE(SUM(delivered), 0) AS BIGINT), CAST(COALESCE(SUM(opened), 0) AS BIGINT) FROM stats_cells";
    match store {
        Store::Sqlite(pool, _) => sqlx::query_as(SUMS).fetch_one(pool).await.unwrap(),
        Store::Postgres(pool, _) => sqlx::query_as(SUMS).fetch_one(pool).await.unwrap(),
    }
}

/// PostgreSQL takes sequence numbers in one order and commits them in
/// another: an event whose transaction took its number first and commits
/// last must still be folded. (SQLite has one writer; the order is one.)
#[tokio::test]
async fn postgres_a_fold_never_passes_an_event_committed_late() {
    let Some(fixture) = store(Backend::Postgres).await else {
        return;
    };
    let store = &fixture.store;
    campaign_to_everyone(store, 20).await;
    store
        .expand_message("msg_c", 0, &AttentionConfig::default())
        .await
        .unwrap();
    let due = store.due_deliveries("c1", 0, 0, 1_000).await.unwrap();
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    store.mark_handed_over(&ids, 5).await.unwrap();
    let Store::Postgres(pool, _) = store else {
        unreachable!("a PostgreSQL fixture");
    };
    // A transaction takes the next sequence number and stays open (an
    // open: the statement adding an event takes its message and kind's count
    // row, so a delivery left open would hold everyone else's back)...
    let (late, rest) = due.split_first().unwrap();
    let mut open = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region)
         VALUES ('msg_c', $1, 3, 10, 'c1', 1, 'tokyo')",
    )
    .bind(&late.user_id)
    .execute(&mut *open)
    .await
    .unwrap();
    // ...while everyone else's receipts commit after it, and a fold runs.
    let receipts: Vec<Receipt> = rest
        .iter()
        .map(|d| receipt("msg_c", &d.user_id, EventKind::Delivered))
        .collect();
    store.record_receipts("c1", &receipts, 10).await.unwrap();
    store.roll_up_queued(1_000, 5_000).await.unwrap();
    open.commit().await.unwrap();
    store.roll_up_all(1_000, 5_000).await.unwrap();
    assert_eq!(
        cube_counts(store).await,
        (rest.len() as i64, 1),
        "the event committed last is folded too"
    );
    fixture.close().await;
}

/// Two relays on one database (or two workers) expanding the same campaign
/// and folding the same events at once: each recipient is planned once and
/// each event folded — and charged — once.
async fn concurrent_expansions_and_folds_count_once(backend: Backend) {
    let Some(fixture) = store(backend).await else {
        return;
    };
    let store = &fixture.store;
    campaign_to_everyone(store, 200).await;
    let expansions: Vec<_> = (0..3)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .expand_message("msg_c", 0, &AttentionConfig::default())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut matched = Vec::new();
    for expansion in expansions {
        matched.push(expansion.await.unwrap());
    }
    matched.sort_unstable();
    assert_eq!(
        matched,
        vec![0, 0, 203],
        "one expansion plans everyone (u1–u3 too)"
    );
    let due = store.due_deliveries("c1", 0, 0, 1_000).await.unwrap();
    assert_eq!(due.len(), 203, "each recipient planned once");
    store
        .mark_handed_over(&due.iter().map(|d| d.id).collect::<Vec<_>>(), 5)
        .await
        .unwrap();
    let receipts: Vec<Receipt> = due
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            let mut kinds = vec![EventKind::Delivered];
            if i % 2 == 0 {
                kinds.push(EventKind::Opened);
            }
            kinds
                .into_iter()
                .map(|kind| receipt("msg_c", &d.user_id, kind))
        })
        .collect();
    store.record_receipts("c1", &receipts, 0).await.unwrap();
    let folds: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.roll_up_all(37, 5_000).await.unwrap() })
        })
        .collect();
    for fold in folds {
        fold.await.unwrap();
    }
    assert_eq!(store.roll_up_backlog().await.unwrap(), 0);
    assert_eq!(
        store.message_charges("msg_c").await.unwrap(),
        203 * 7 + 102 * 3
    );
    assert_eq!(
        cube_counts(store).await,
        (203, 102),
        "statistics fold each event once"
    );
    fixture.close().await;
}

backend_tests!(
    concurrent_expansions_and_folds_count_once,
    quote_charge_statement_and_revenue_agree,
    an_auction_sells_scarce_capacity,
    the_ledger_charges_deduplicated_events_once,
    concurrent_bids_and_sends_never_oversell,
);
