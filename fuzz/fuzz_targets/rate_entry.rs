//! Any text as a rate card entry (`chukei-admin rate-card --entry`): parsed
//! or refused naming the flag.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(error) = enterprise_cli::operator::parse_rate_entry(text) {
        assert!(error.to_string().starts_with("--entry"), "{error}");
    }
});
