//! The rollup worker: folds the events hand-overs and receipts queued into
//! the statistics and learning tables (`Store::roll_up_queued`), in batches
//! and off the delivery path. Figures therefore trail the events by about one
//! interval; the queue is durable, so nothing is lost across a restart.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::storage::Store;

/// Events folded per transaction.
const BATCH: u32 = 10_000;

/// Folds queued events every `interval` of real time until `cancel`; a full
/// batch is followed at once by the next.
pub async fn run(store: Store, interval: Duration, cancel: CancellationToken) {
    loop {
        match store.roll_up_queued(BATCH).await {
            Ok(folded) if folded == u64::from(BATCH) => {
                if cancel.is_cancelled() {
                    return;
                }
                tokio::task::yield_now().await;
                continue;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "rolling up events failed, will retry"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
