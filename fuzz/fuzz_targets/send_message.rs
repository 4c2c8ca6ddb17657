//! Any bytes as a `SendMessage` request: decoding and validation never panic,
//! and a refusal names a field.
#![no_main]

use chukei_proto::relay::v1::SendMessageRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use relay_svc::targeting::NewMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = SendMessageRequest::decode(data) {
        if let Err(error) = NewMessage::try_from(request) {
            assert!(error.to_string().contains(':'), "{error}");
        }
    }
});
