//! Hostile input at the enterprise edge, as property tests: whatever a
//! `SendMessage` request holds — any strings (controls, emoji, huge), any
//! enum numbers, any timestamps and durations, any lists — converting it to
//! a message never panics, and a refusal always names a field of the
//! request. Arbitrary bytes decoded as a request behave the same.

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use proptest::prelude::*;
use prost::Message;
use relay_svc::targeting::{MAX_REFS, MAX_TEXT_BYTES, NewMessage, Target};

/// Top-level fields of `SendMessageRequest`: every refusal starts with one.
const FIELDS: [&str; 13] = [
    "idempotency_key",
    "target",
    "content",
    "channel",
    "all_carriers",
    "policy",
    "window",
    "window_mode",
    "expires_at",
    "follow_up",
    "priority",
    "send_time",
    "bid_id",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z0-9_]{1,20}",
        "(\u{1F469}\u{200D}\u{1F4BB}|[ａ-ｚ０-９]|\u{0}|\u{7}|\u{202E}|x){0,90}",
        (0usize..3).prop_map(|n| "ｘ".repeat([1, 300_000, 400_000][n])),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (
            prop_oneof![any::<i64>(), -10i64..10, 1_700_000_000i64..1_900_000_000],
            any::<i32>(),
        )
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    proptest::option::of(
        (prop_oneof![any::<i64>(), 0i64..100_000], any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn enum_number() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..8, any::<i32>()]
}

fn content() -> impl Strategy<Value = Option<common::Content>> {
    proptest::option::of(
        (text(), text(), text(), prop::collection::vec(text(), 0..4)).prop_map(
            |(text, media_url, subject, suggested_replies)| common::Content {
                text,
                media_url,
                subject,
                suggested_replies,
            },
        ),
    )
}

fn target() -> impl Strategy<Value = Option<pb::Target>> {
    let kind = prop_oneof![
        prop::collection::vec(text(), 0..5)
            .prop_map(|refs| pb::target::Kind::Refs(pb::RefList { refs })),
        (0usize..2).prop_map(|n| pb::target::Kind::Refs(pb::RefList {
            refs: (0..[MAX_REFS + 1, 3][n]).map(|i| format!("r{i}")).collect(),
        })),
        any::<bool>().prop_map(pb::target::Kind::AllRegistered),
        text().prop_map(pb::target::Kind::ServiceId),
        (
            enum_number(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(text(), 0..3),
            text(),
        )
            .prop_map(
                |(gender, age_min, age_max, regions, occupations, service_id)| {
                    pb::target::Kind::Segment(pb::Segment {
                        gender,
                        age_min,
                        age_max,
                        regions,
                        occupations,
                        service_id,
                    })
                }
            ),
    ];
    proptest::option::of(proptest::option::of(kind).prop_map(|kind| pb::Target { kind }))
}

fn window() -> impl Strategy<Value = Option<common::DeliveryWindow>> {
    let kind = prop_oneof![
        (timestamp(), timestamp()).prop_map(|(start, end)| {
            common::delivery_window::Kind::Absolute(common::AbsoluteWindow { start, end })
        }),
        (
            any::<u32>(),
            0u32..1500,
            prop_oneof![text(), Just("Asia/Tokyo".to_owned())]
        )
            .prop_map(|(start_minute, end_minute, time_zone)| {
                common::delivery_window::Kind::Daily(common::DailyWindow {
                    start_minute,
                    end_minute,
                    time_zone,
                })
            }),
    ];
    proptest::option::of(
        proptest::option::of(kind).prop_map(|kind| common::DeliveryWindow { kind }),
    )
}

fn policy() -> impl Strategy<Value = Option<pb::DeliveryPolicy>> {
    proptest::option::of(
        (
            enum_number(),
            prop::collection::vec(enum_number(), 0..6),
            duration(),
            any::<u32>(),
            enum_number(),
        )
            .prop_map(|(kind, channels, timeout, max_resends, resend_until)| {
                pb::DeliveryPolicy {
                    kind,
                    channels,
                    timeout,
                    max_resends,
                    resend_until,
                }
            }),
    )
}

fn request() -> impl Strategy<Value = pb::SendMessageRequest> {
    (
        (
            text(),
            target(),
            content(),
            enum_number(),
            any::<bool>(),
            policy(),
        ),
        (
            window(),
            enum_number(),
            timestamp(),
            proptest::option::of((content(), duration(), enum_number())),
            enum_number(),
            text(),
        ),
    )
        .prop_map(
            |(
                (idempotency_key, target, content, channel, all_carriers, policy),
                (window, window_mode, expires_at, follow_up, priority, bid_id),
            )| pb::SendMessageRequest {
                idempotency_key,
                target,
                content,
                channel,
                all_carriers,
                policy,
                window,
                window_mode,
                expires_at,
                follow_up: follow_up.map(|(content, delay, channel)| pb::FollowUp {
                    content,
                    delay,
                    channel,
                }),
                priority,
                send_time: None,
                bid_id,
            },
        )
}

fn check(request: pb::SendMessageRequest) -> Result<(), TestCaseError> {
    match NewMessage::try_from(request) {
        Ok(message) => {
            prop_assert!(!message.idempotency_key.is_empty());
            prop_assert!(!message.content.text.trim().is_empty());
            prop_assert!(message.content.text.len() <= MAX_TEXT_BYTES);
            if let Target::Refs(refs) = &message.target {
                prop_assert!(!refs.is_empty() && refs.len() <= MAX_REFS);
            }
        }
        Err(error) => {
            let said = error.to_string();
            prop_assert!(
                FIELDS.iter().any(|field| said.starts_with(field)),
                "the refusal names no field: {said}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_request_is_converted_or_refused_by_field(request in request()) {
        check(request)?;
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok(request) = pb::SendMessageRequest::decode(&bytes[..]) {
            check(request)?;
        }
    }
}
