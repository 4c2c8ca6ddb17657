//! Crash points: named moments at which a test makes a service die on the
//! spot, as `kill -9` would, to prove that what it committed before that
//! moment is all a restart needs (the chaos harness, `tests/src/chaos`).
//!
//! With `CHUKEI_CRASH_AT=<point>:<n>` in its environment a process aborts
//! the `n`-th time it reaches `<point>` (no destructor runs, nothing is
//! flushed: SQLite and PostgreSQL keep only what was committed). Unset — in
//! every deployment — a point costs one load of a value read at start-up.
//! A service checks the variable when it starts ([`check_armed`]), so a misspelt
//! point is refused rather than never reached.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a point.
pub const ENV: &str = "CHUKEI_CRASH_AT";

/// The relay stored a carrier's receipts; the carrier has not been acked.
pub const RELAY_RECEIPTS_STORED: &str = "relay.receipts-stored";
/// A carrier acked a batch; the relay has not marked it handed over.
pub const RELAY_BATCH_ACKED: &str = "relay.batch-acked";
/// A campaign's expansion step committed; the next has not begun.
pub const RELAY_EXPANSION_STEP: &str = "relay.expansion-step";
/// A rollup fold wrote its rollups and moved its cursor, uncommitted.
pub const RELAY_FOLD_UNCOMMITTED: &str = "relay.fold-uncommitted";
/// A carrier stored a batch from the relay; the relay has not been acked.
pub const CARRIER_BATCH_STORED: &str = "carrier.batch-stored";

/// Every point, in the order the chaos harness visits them.
pub const POINTS: [&str; 5] = [
    RELAY_RECEIPTS_STORED,
    RELAY_BATCH_ACKED,
    RELAY_EXPANSION_STEP,
    RELAY_FOLD_UNCOMMITTED,
    CARRIER_BATCH_STORED,
];

/// The armed point: its name, at which arrival, and the arrivals so far.
#[derive(Debug)]
struct Armed {
    point: &'static str,
    at: u64,
    arrivals: AtomicU64,
}

fn parse(value: &str) -> Result<Armed, String> {
    let (name, at) = value
        .split_once(':')
        .ok_or_else(|| format!("{ENV}={value:?}: expected <point>:<n>"))?;
    let point = POINTS
        .into_iter()
        .find(|point| *point == name)
        .ok_or_else(|| format!("{ENV}: {name:?} is not a crash point (one of {POINTS:?})"))?;
    let at = at
        .parse::<u64>()
        .ok()
        .filter(|at| *at > 0)
        .ok_or_else(|| format!("{ENV}: {at:?} is not a positive count of arrivals"))?;
    Ok(Armed {
        point,
        at,
        arrivals: AtomicU64::new(0),
    })
}

fn armed_point() -> &'static Result<Option<Armed>, String> {
    static ARMED: OnceLock<Result<Option<Armed>, String>> = OnceLock::new();
    ARMED.get_or_init(|| match std::env::var(ENV) {
        Ok(value) => parse(&value).map(Some),
        Err(_) => Ok(None),
    })
}

/// Checks the variable at start-up: an error naming it when it does not
/// name a point and a count; a warning in the log when a point is armed.
pub fn check_armed() -> anyhow::Result<()> {
    match armed_point() {
        Ok(Some(armed)) => {
            tracing::warn!(
                point = armed.point,
                at = armed.at,
                "a crash point is armed: this process aborts there (a test hook)"
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(error) => Err(anyhow::anyhow!("{error}")),
    }
}

/// Reached `point`: aborts the process if it is armed there and this is
/// the arrival it was armed for.
pub fn point(point: &'static str) {
    let Ok(Some(armed)) = armed_point() else {
        return;
    };
    if armed.point == point && armed.arrivals.fetch_add(1, Ordering::SeqCst) + 1 == armed.at {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_and_a_count_arm_it() {
        let armed = parse("relay.receipts-stored:3").unwrap();
        assert_eq!((armed.point, armed.at), (RELAY_RECEIPTS_STORED, 3));
    }

    #[test]
    fn a_bad_setting_names_the_variable_and_the_reason() {
        let unknown = parse("relay.nowhere:1").unwrap_err();
        assert!(
            unknown.contains(ENV) && unknown.contains("not a crash point"),
            "{unknown}"
        );
        let count = parse("carrier.batch-stored:0").unwrap_err();
        assert!(count.contains("positive count"), "{count}");
        let shape = parse("carrier.batch-stored").unwrap_err();
        assert!(shape.contains("<point>:<n>"), "{shape}");
    }
}
