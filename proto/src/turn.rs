//! One writer at a time, in the order they came — except that writers
//! marked `ahead` (a targeted message's) go before every other writer
//! still waiting. SQLite has one writer; a second writer of the same
//! process would wait for the lock in the busy handler's sleeps (1, 2, 5 …
//! ms), so each service's writers queue here instead. Writers that are not
//! ahead queue one at a time for the lock itself, so a writer ahead waits
//! for at most the one holding the turn and one other. Used by the relay
//! (`relay-svc/src/storage/group.rs`) and the carrier.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The write turn; clone the `Arc` to share it.
#[derive(Debug, Default)]
pub struct Turn {
    lock: Arc<Mutex<()>>,
    /// Where writers not ahead wait for their place at `lock`.
    queue: Mutex<()>,
}

impl Turn {
    /// Waits for the turn, ahead of the writers still queued when `ahead`;
    /// held until the guard drops.
    pub async fn take(&self, ahead: bool) -> OwnedMutexGuard<()> {
        if ahead {
            return self.lock.clone().lock_owned().await;
        }
        let _next = self.queue.lock().await;
        self.lock.clone().lock_owned().await
    }
}
