//! Any text split into SMS parts: the parts rebuild the text, none is empty.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let parts = carrier_svc::channels::sms_segments(text);
    assert_eq!(parts.concat(), text);
    if parts.len() > 1 {
        assert!(parts.iter().all(|p| !p.is_empty()));
    }
});
