//! The follow-through loop: delivery control that happens after planning, on
//! the relay's clock — fallback and resend timers, reactions to unsupported
//! channels, windows that closed on held deliveries, and expiry. Each pass is
//! a handful of set-based statements (`Store::follow_through`); when a pass
//! makes new attempts due, the dispatchers are woken.

use std::time::Duration;

use chukei_proto::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DispatchHandle;
use crate::storage::Store;

/// Runs passes every `interval` of real time (the clock decides what is due,
/// so a manual or scaled clock drives it) until `cancel`.
pub async fn run(
    store: Store,
    clock: Clock,
    dispatch: DispatchHandle,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        match store.follow_through(clock.now_ms()).await {
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
