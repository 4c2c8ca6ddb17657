//! Any text as the CLI's segment expression: parsed or refused, never a
//! panic; what parses goes through the relay's validation without one.
#![no_main]

use chukei_proto::relay::v1 as pb;
use libfuzzer_sys::fuzz_target;
use relay_svc::targeting::NewMessage;

fuzz_target!(|text: &str| {
    if let Ok(segment) = enterprise_cli::parse_segment(text) {
        if let (Some(min), Some(max)) = (segment.age_min, segment.age_max) {
            assert!(min <= max);
        }
        let request = pb::SendMessageRequest {
            idempotency_key: "fuzz".into(),
            target: Some(pb::Target {
                kind: Some(pb::target::Kind::Segment(segment)),
            }),
            content: Some(chukei_proto::common::v1::Content {
                text: "hi".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = NewMessage::try_from(request);
    }
});
