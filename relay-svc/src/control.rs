//! The follow-through loop: delivery control that happens after planning, on
//! the relay's clock — fallback and resend timers, reactions to unsupported
//! channels, windows that closed on held deliveries, and expiry. Each pass is
//! a handful of set-based statements (`Store::follow_through`); when a pass
//! makes new attempts due, the dispatchers are woken. The same loop closes
//! auctions, reprices, and reconciles deliveries no carrier confirmed
//! (`Store::reconcile_deliveries`: offered again, or expired after the
//! message's expiry — logged, counted in
//! `chukei_relay_deliveries_reconciled_total`, noted in the decision trace).

use std::time::Duration;

use chukei_proto::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DispatchHandle;
use crate::lease::Lease;
use crate::metrics::RelayMetrics;
use crate::storage::{Reconciling, Store};

/// What the loop works with.
pub struct Control {
    pub store: Store,
    pub clock: Clock,
    pub dispatch: DispatchHandle,
    pub metrics: RelayMetrics,
    /// Between passes (real time).
    pub interval: Duration,
    pub reprice_interval_ms: i64,
    pub reconciling: Reconciling,
    pub lease: Lease,
}

/// Runs passes every `interval` of real time (the clock decides what is due,
/// so a manual or scaled clock drives it) until `cancel`.
/// Starts the follow-through loop on its own task; it stops when `cancel` fires.
pub fn start(control: Control, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(control, cancel))
}

async fn run(control: Control, cancel: CancellationToken) {
    // When the lease was last held: renewed every third of its time to
    // live, not at every pass (each renewal is a write and a commit).
    let mut held_at: Option<tokio::time::Instant> = None;
    loop {
        // One replica at a time runs the follow-through.
        let renew = held_at.is_none_or(|at| at.elapsed() >= control.lease.renew_every());
        if renew {
            let asked = tokio::time::Instant::now();
            held_at = control
                .lease
                .hold(&control.store, "control")
                .await
                .then_some(asked);
        }
        if held_at.is_none() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(control.lease.renew_every()) => continue,
            }
        }
        let now = control.clock.now_ms();
        control.close_auctions(now).await;
        control.reprice(now).await;
        control.reconcile(now).await;
        if control.follow_through(now).await {
            // More may be waiting beyond this pass's limits.
            if cancel.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(control.interval) => {}
        }
    }
}

impl Control {
    /// Closes the auction slots whose bidding ended by `now`.
    async fn close_auctions(&self, now: i64) {
        match self.store.close_due_slots(now).await {
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
    }

    /// Publishes dynamic prices when a repricing interval has passed.
    async fn reprice(&self, now: i64) {
        match self
            .store
            .reprice_if_due(now, self.reprice_interval_ms)
            .await
        {
            Ok(Some(version)) => tracing::info!(version, "dynamic prices published"),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "repricing failed, will retry"),
        }
    }

    /// Offers again (or expires) deliveries no carrier confirmed.
    async fn reconcile(&self, now: i64) {
        match self.store.reconcile_deliveries(now, self.reconciling).await {
            Ok(done) => {
                if done.reoffered > 0 || done.expired > 0 {
                    tracing::info!(
                        messages = done.messages,
                        reoffered = done.reoffered,
                        expired = done.expired,
                        settled = done.settled,
                        "reconciled deliveries no carrier confirmed"
                    );
                    self.metrics
                        .reconciled
                        .add(&[("action", "reoffered")], done.reoffered);
                    self.metrics
                        .reconciled
                        .add(&[("action", "expired")], done.expired);
                    self.dispatch.new_work();
                }
            }
            Err(error) => tracing::warn!(%error, "reconciliation pass failed, will retry"),
        }
    }

    /// Runs one delivery-control pass; true when it did something (and so
    /// more may be due at once).
    async fn follow_through(&self, now: i64) -> bool {
        match self.store.follow_through(now).await {
            Ok(done) if done.did_anything() => {
                tracing::info!(
                    timers = done.groups,
                    windows_rolled = done.rolled,
                    messages_expired = done.expired,
                    "delivery control pass"
                );
                self.dispatch.new_work();
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "delivery control pass failed, will retry");
                false
            }
        }
    }
}
