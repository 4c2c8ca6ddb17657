//! The rollup worker: folds the events hand-overs and receipts added (the
//! events are its log; it keeps a cursor) into the statistics and learning
//! tables and charges them to the billing ledger (`Store::roll_up_queued`),
//! in batches of [`BATCH`] and off the delivery path. While events keep arriving it
//! stands aside — the delivery path has the database and the CPU — for at
//! most [`MAX_DEFERRAL`], then folds everything past its cursor. Figures
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
/// batch is a quarter of that (`Store::bulk_slice`).
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
    let mut last_seen = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let newest = match store.roll_up_newest().await {
            Ok(Some(newest)) => newest,
            Ok(None) => {
                waiting_since = None;
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "reading the events log failed, will retry");
                continue;
            }
        };
        let growing = last_seen.is_some_and(|seen| newest != seen);
        last_seen = Some(newest);
        let since = *waiting_since.get_or_insert_with(Instant::now);
        if growing && since.elapsed() < MAX_DEFERRAL {
            continue;
        }
        loop {
            let batch = store.bulk_slice(BATCH);
            match store.roll_up_queued(batch, clock.now_ms()).await {
                Ok(folded) if folded == u64::from(batch) && !cancel.is_cancelled() => {
                    tokio::task::yield_now().await;
                }
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "rolling up events failed, will retry");
                    break;
                }
            }
        }
        waiting_since = None;
    }
}
