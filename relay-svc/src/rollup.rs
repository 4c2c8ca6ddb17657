//! The rollup worker: folds the events hand-overs and receipts added (the
//! events are its log; it keeps a cursor) into the statistics and learning
//! tables and charges them to the billing ledger (`Store::roll_up_queued`),
//! in batches of [`BATCH`] and off the delivery path. While events keep arriving it
//! stands aside — the delivery path has the database and the CPU — for at
//! most [`MAX_DEFERRAL`], then folds what the log held when it looked, and
//! stands aside again if the log is still growing. Figures
//! therefore trail the events by about one interval when the hub is quiet
//! and by up to the deferral under load; the log and the cursor are durable
//! and move in one transaction, so nothing is lost or folded twice across a
//! restart.

use std::time::{Duration, Instant};

use chukei_proto::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::storage::Store;

/// Events folded per transaction: a bounded slice of the writer. On SQLite
/// every other writer waits for the one holding the write turn, and a fold
/// of 10,000 events held it 100–250 ms under a broadcast (the write turn's
/// metric); 2,000 hold it a fifth of that for ~10 % of the fold's rate
/// (`docs/benchmarks.md`). While targeted messages are being accepted a
/// batch is an eighth of that (`Store::bulk_slice`).
pub const BATCH: u32 = 2_000;

/// The longest the worker yields to a busy delivery path.
pub const MAX_DEFERRAL: Duration = Duration::from_secs(10);

/// Looks at the queue every `interval` of real time until `cancel`.
/// Starts the rollup worker on its own task; it stops when `cancel` fires.
pub fn start(
    store: Store,
    clock: Clock,
    interval: Duration,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(store, clock, interval, cancel))
}

async fn run(store: Store, clock: Clock, interval: Duration, cancel: CancellationToken) {
    let mut pacing = Pacing::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let newest = match store.roll_up_newest().await {
            Ok(newest) => newest,
            Err(error) => {
                tracing::warn!(%error, "reading the events log failed, will retry");
                continue;
            }
        };
        if pacing.look(newest, Instant::now()) != Look::Fold {
            continue;
        }
        // What the log held when the worker looked: the pass folds that
        // much and no more, so it does not chase a log the delivery path
        // keeps growing (it stands aside again at the next look).
        let mut left = match store.roll_up_backlog().await {
            Ok(backlog) => backlog,
            Err(error) => {
                tracing::warn!(%error, "reading the events log failed, will retry");
                continue;
            }
        };
        while left > 0 && !cancel.is_cancelled() {
            let batch = store.bulk_slice(BATCH);
            match store.roll_up_queued(batch, clock.now_ms()).await {
                Ok(folded) if folded == u64::from(batch) => {
                    left = left.saturating_sub(folded);
                    tokio::task::yield_now().await;
                }
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "rolling up events failed, will retry");
                    break;
                }
            }
        }
    }
}

/// What the worker does after a look at the events log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Look {
    /// Nothing past the cursor.
    Nothing,
    /// The log is growing: the delivery path has the writer.
    StandAside,
    /// Fold what the log holds now.
    Fold,
}

/// When the worker folds: not while the events log keeps growing, for at
/// most [`MAX_DEFERRAL`] from the first look that found it growing.
#[derive(Debug, Default)]
struct Pacing {
    /// The newest event the last look found past the cursor.
    last_seen: Option<i64>,
    /// Since when the worker has stood aside.
    waiting_since: Option<Instant>,
}

impl Pacing {
    /// Decides at `now`, given the newest event past the fold's cursor.
    /// The first look after start-up cannot tell a growing log from a still
    /// one and counts as growing: a relay restarted during a broadcast
    /// folded from its first look on, and its passes chased the log for
    /// as long as the broadcast lasted.
    fn look(&mut self, newest: Option<i64>, now: Instant) -> Look {
        let Some(newest) = newest else {
            self.waiting_since = None;
            return Look::Nothing;
        };
        let growing = self.last_seen != Some(newest);
        self.last_seen = Some(newest);
        let since = *self.waiting_since.get_or_insert(now);
        if growing && now.duration_since(since) < MAX_DEFERRAL {
            return Look::StandAside;
        }
        self.waiting_since = None;
        Look::Fold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_still_log_is_folded_at_the_second_look() {
        let mut pacing = Pacing::default();
        let t0 = Instant::now();
        assert_eq!(pacing.look(None, t0), Look::Nothing);
        assert_eq!(pacing.look(Some(7), t0), Look::StandAside);
        assert_eq!(
            pacing.look(Some(7), t0 + Duration::from_millis(100)),
            Look::Fold
        );
        assert_eq!(
            pacing.look(None, t0 + Duration::from_millis(200)),
            Look::Nothing
        );
    }

    #[test]
    fn a_growing_log_waits_at_most_the_deferral_then_again() {
        let mut pacing = Pacing::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut newest = 0;
        let mut look = |pacing: &mut Pacing, ms| {
            newest += 1000;
            pacing.look(Some(newest), at(ms))
        };
        assert_eq!(look(&mut pacing, 0), Look::StandAside);
        assert_eq!(look(&mut pacing, 9_900), Look::StandAside);
        assert_eq!(look(&mut pacing, 10_000), Look::Fold);
        // Still growing after the pass: it stands aside for another deferral.
        assert_eq!(look(&mut pacing, 10_100), Look::StandAside);
        assert_eq!(look(&mut pacing, 20_000), Look::StandAside);
        assert_eq!(look(&mut pacing, 20_100), Look::Fold);
    }

    #[test]
    fn a_log_that_stops_growing_is_folded_at_once() {
        let mut pacing = Pacing::default();
        let t0 = Instant::now();
        assert_eq!(pacing.look(Some(10), t0), Look::StandAside);
        assert_eq!(
            pacing.look(Some(20), t0 + Duration::from_secs(1)),
            Look::StandAside
        );
        assert_eq!(
            pacing.look(Some(20), t0 + Duration::from_secs(2)),
            Look::Fold
        );
    }
}
