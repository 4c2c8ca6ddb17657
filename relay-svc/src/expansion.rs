//! The campaign expander: turns accepted messages with large targets (all
//! registered, a service, a segment) into deliveries after `SendMessage` has
//! answered. Each expansion is one transaction, so a crash mid-way leaves the
//! message `Accepted` and it is expanded again on restart. It must never do
//! per-recipient work outside SQL.

use std::sync::Arc;
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::telemetry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dispatch::DispatchHandle;
use crate::metrics::RelayMetrics;
use crate::policy::AttentionConfig;
use crate::storage::Store;

/// How many accepted messages one pass claims.
const CLAIM: u32 = 16;

/// Runs until `cancel`: expands whatever is accepted, then waits for `wake`
/// (or a periodic re-check).
/// Starts the expander on its own task; it stops when `cancel` fires.
pub fn start(
    store: Store,
    clock: Clock,
    metrics: RelayMetrics,
    attention: AttentionConfig,
    wake: Arc<Notify>,
    dispatch: DispatchHandle,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(
        store, clock, metrics, attention, wake, dispatch, cancel,
    ))
}

async fn run(
    store: Store,
    clock: Clock,
    metrics: RelayMetrics,
    attention: AttentionConfig,
    wake: Arc<Notify>,
    dispatch: DispatchHandle,
    cancel: CancellationToken,
) {
    loop {
        let mut expanded_any = false;
        match store.messages_to_expand(CLAIM).await {
            Ok(ids) => {
                for (message_id, trace_parent) in ids {
                    if cancel.is_cancelled() {
                        return;
                    }
                    let span = tracing::info_span!("expand campaign", %message_id);
                    telemetry::continue_trace(&span, &trace_parent);
                    match store
                        .expand_message(&message_id, clock.now_ms(), &attention)
                        .instrument(span)
                        .await
                    {
                        Ok(matched) => {
                            expanded_any = true;
                            metrics.expanded.add(&[], matched);
                            tracing::info!(%message_id, matched, "campaign expanded");
                            dispatch.new_work();
                        }
                        Err(error) => {
                            tracing::warn!(%message_id, error = ?error, "campaign expansion failed, will retry");
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "could not read campaigns to expand"),
        }
        if expanded_any {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
