//! The follow-through loop: delivery control that happens after planning, on
//! the relay's clock — fallback and resend timers, reactions to unsupported
//! channels, windows that closed on held deliveries, and expiry. Each pass is
//! a handful of set-based statements (`Store::follow_through`); when a pass
//! makes new attempts due, the dispatchers are woken.

use std::time::Duration;

use chukei_proto::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DispatchHandle;
use crate::lease::Lease;
use crate::storage::Store;

/// Runs passes every `interval` of real time (the clock decides what is due,
/// so a manual or scaled clock drives it) until `cancel`.
pub async fn run(
    store: Store,
    clock: Clock,
    dispatch: DispatchHandle,
    interval: Duration,
    reprice_interval_ms: i64,
    lease: Lease,
    cancel: CancellationToken,
) {
    loop {
        // One replica at a time runs the follow-through.
        if !lease.hold(&store, "control").await {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(lease.renew_every()) => continue,
            }
        }
        let now = clock.now_ms();
        match store.close_due_slots(now).await {
            Ok(closed) => {
                for slot in closed {
                    tracing::info!(
                        slot_id = %slot.slot_id,
                        bids = slot.bids,
                        awarded = slot.awarded,
                        clearing_price = ?slot.clearing_price,
                        "auction closed"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "closing auctions failed, will retry"),
        }
        match store.reprice_if_due(now, reprice_interval_ms).await {
            Ok(Some(version)) => tracing::info!(version, "dynamic prices published"),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "repricing failed, will retry"),
        }
        match store.follow_through(now).await {
            Ok(done) if done.did_anything() => {
                tracing::info!(
                    timers = done.groups,
                    windows_rolled = done.rolled,
                    messages_expired = done.expired,
                    "delivery control pass"
                );
                dispatch.new_work();
                // More may be waiting beyond this pass's limits.
                if cancel.is_cancelled() {
                    return;
                }
                continue;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "delivery control pass failed, will retry"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
