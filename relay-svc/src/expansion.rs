//! The campaign expander: turns accepted messages with large targets (all
//! registered, a service, a segment) into deliveries after `SendMessage` has
//! answered. A campaign is expanded in steps of `--expansion-step`
//! registrations ([`EXPANSION_CHUNK`] by default; an eighth of that while
//! targeted messages are being accepted, `Store::bulk_slice`), each one
//! transaction that moves the message's cursor, so a
//! crash mid-way leaves the message `Accepted` with its cursor and its
//! expansion goes on from there on restart; the dispatchers are woken after
//! every step, so the first people are handed over while the rest are
//! planned. It must never do per-recipient work outside SQL.

use std::sync::Arc;
use std::time::Duration;

use chukei_proto::clock::Clock;
use chukei_proto::crash;
use chukei_proto::telemetry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dispatch::DispatchHandle;
use crate::metrics::RelayMetrics;
use crate::policy::AttentionConfig;
#[cfg(doc)]
use crate::storage::EXPANSION_CHUNK;
use crate::storage::{Expansion, Lane, StatisticsWatch, Store};

/// How many accepted messages one pass claims.
const CLAIM: u32 = 16;

/// How campaigns are planned: the attention rules (quiet periods, fatigue)
/// and how many registrations a step covers (`--expansion-step`).
#[derive(Clone, Debug)]
pub struct Planning {
    pub attention: AttentionConfig,
    pub step: u32,
}

/// Runs until `cancel`: expands whatever is accepted, then waits for `wake`
/// (or a periodic re-check).
/// Starts the expander on its own task; it stops when `cancel` fires.
pub fn start(
    store: Store,
    clock: Clock,
    metrics: RelayMetrics,
    planning: Planning,
    wake: Arc<Notify>,
    dispatch: DispatchHandle,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(store, clock, metrics, planning, wake, dispatch, cancel))
}

async fn run(
    store: Store,
    clock: Clock,
    metrics: RelayMetrics,
    planning: Planning,
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
                    let expanded =
                        expand(&store, &message_id, &clock, &planning, &dispatch, &cancel)
                            .instrument(span)
                            .await;
                    match expanded {
                        Ok(Some(Expansion::Done { matched })) => {
                            expanded_any = true;
                            metrics.expanded.add(&[], matched);
                            tracing::info!(%message_id, matched, "campaign expanded");
                        }
                        // Another relay is at it: it goes on, this one waits
                        // for new work or the next look rather than asking
                        // again at once.
                        Ok(Some(_)) => {
                            tracing::debug!(%message_id, "campaign being expanded by another relay");
                        }
                        // Stopped between steps; the cursor keeps its place.
                        Ok(None) => return,
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

/// Expands one campaign step by step (its plan and `best`'s priors read
/// once), waking the dispatchers after each: `Done` with the people
/// matched, `NotHere` when another relay holds it or it is no longer
/// accepted, or `None` when `cancel` fired between steps.
async fn expand(
    store: &Store,
    message_id: &str,
    clock: &Clock,
    planning: &Planning,
    dispatch: &DispatchHandle,
    cancel: &CancellationToken,
) -> crate::error::Result<Option<Expansion>> {
    let Some(campaign) = store.campaign_to_expand(message_id, clock.now_ms()).await? else {
        return Ok(Some(Expansion::NotHere));
    };
    let mut statistics = StatisticsWatch::default();
    loop {
        let step = store
            .expand_step(
                &campaign,
                clock.now_ms(),
                &planning.attention,
                store.bulk_slice(planning.step),
            )
            .await?;
        crash::point(crash::RELAY_EXPANSION_STEP);
        // A campaign's attempts are in the bulk lane: the priority streams
        // are not woken (each step woke them to an empty read, in a 100k
        // broadcast 1,335 reads of ~0.5 ms on SQLite's threads).
        dispatch.new_work_in(Lane::Bulk);
        statistics.after(store, step).await;
        match step {
            Expansion::Done { .. } | Expansion::NotHere => return Ok(Some(step)),
            Expansion::Continues { .. } if cancel.is_cancelled() => return Ok(None),
            Expansion::Continues { .. } => {}
        }
    }
}
