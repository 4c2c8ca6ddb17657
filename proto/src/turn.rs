//! One writer at a time, in the order they came — except that writers
//! marked `ahead` (a targeted message's) go before every other writer
//! still waiting. SQLite has one writer; a second writer of the same
//! process would wait for the lock in the busy handler's sleeps (1, 2, 5 …
//! ms), so each service's writers queue here instead. Writers that are not
//! ahead queue one at a time for the lock itself; the one that gets it
//! while a writer ahead waits lets that one go first, once, so a writer
//! ahead waits for the one holding the turn and no other (and a writer not
//! ahead is passed over at most once for each time it takes the turn).
//!
//! A writer ahead still waits for the whole transaction holding the turn,
//! so bulk writers keep theirs short while writers ahead are about:
//! [`Turn::ahead_waiting`] says one is waiting now (a group stops taking in
//! members and commits), [`Turn::ahead_lately`] that one came within the
//! last [`LATELY`] (bulk work is cut into slices of a few milliseconds).
//! A control write that comes every few seconds (a lease renewal) goes
//! ahead without counting for [`Turn::ahead_lately`]
//! ([`Turn::take_ahead_unnoted`]): it can wait for one bulk transaction,
//! and counted, it kept every campaign's work in slices.
//! Used by the relay (`relay-svc/src/storage/group.rs`) and the carrier.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMutexGuard};

/// How long after a writer ahead the turn counts as wanted by writers ahead.
pub const LATELY: Duration = Duration::from_secs(2);

/// The write turn; clone the `Arc` to share it.
#[derive(Debug)]
pub struct Turn {
    lock: Arc<Mutex<()>>,
    /// Where writers not ahead wait for their place at `lock`.
    queue: Mutex<()>,
    /// Writers ahead waiting for `lock` now.
    waiting_ahead: AtomicUsize,
    /// When a writer ahead last asked for the turn, in milliseconds after
    /// `since`, plus one (0: never).
    last_ahead: AtomicU64,
    since: Instant,
}

impl Default for Turn {
    fn default() -> Self {
        Self {
            lock: Arc::default(),
            queue: Mutex::default(),
            waiting_ahead: AtomicUsize::new(0),
            last_ahead: AtomicU64::new(0),
            since: Instant::now(),
        }
    }
}

impl Turn {
    /// Waits for the turn, ahead of the writers still queued when `ahead`;
    /// held until the guard drops.
    pub async fn take(&self, ahead: bool) -> OwnedMutexGuard<()> {
        if ahead {
            let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.last_ahead.store(now + 1, Ordering::Relaxed);
            return self.take_ahead_unnoted().await;
        }
        let _next = self.queue.lock().await;
        let held = self.lock.clone().lock_owned().await;
        if !self.ahead_waiting() {
            return held;
        }
        // The lock is fair: writers ahead that queued for it while this one
        // waited get it now, and this one after them.
        drop(held);
        self.lock.clone().lock_owned().await
    }

    /// Waits for the turn ahead of the writers still queued, like a writer
    /// ahead, without counting for [`Turn::ahead_lately`]: for a write that
    /// comes every few seconds and may wait for one bulk transaction (a
    /// lease renewal), so bulk work goes on in whole transactions.
    pub async fn take_ahead_unnoted(&self) -> OwnedMutexGuard<()> {
        let _waiting = Waiting::new(&self.waiting_ahead);
        self.lock.clone().lock_owned().await
    }

    /// Whether a writer ahead is waiting for the turn right now.
    pub fn ahead_waiting(&self) -> bool {
        self.waiting_ahead.load(Ordering::Relaxed) > 0
    }

    /// Whether a writer ahead asked for the turn within the last [`LATELY`].
    pub fn ahead_lately(&self) -> bool {
        match self.last_ahead.load(Ordering::Relaxed) {
            0 => false,
            stamp => {
                let asked = self.since + Duration::from_millis(stamp - 1);
                asked.elapsed() < LATELY
            }
        }
    }
}

/// Counts a writer ahead as waiting until it holds the turn or gives up.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer ahead, once it is waiting for the turn.
    async fn ahead_waiting(turn: &Arc<Turn>) -> tokio::task::JoinHandle<()> {
        let ahead = tokio::spawn({
            let turn = turn.clone();
            async move {
                let _held = turn.take(true).await;
            }
        });
        while !turn.ahead_waiting() {
            tokio::task::yield_now().await;
        }
        ahead
    }

    #[tokio::test]
    async fn a_writer_ahead_is_seen_waiting_until_it_holds_the_turn() {
        let turn = Arc::new(Turn::default());
        assert!(!turn.ahead_lately());
        let held = turn.take(false).await;
        assert!(!turn.ahead_waiting());
        let ahead = ahead_waiting(&turn).await;
        assert!(turn.ahead_lately());
        drop(held);
        ahead.await.unwrap();
        assert!(!turn.ahead_waiting());
        assert!(turn.ahead_lately());
    }

    #[tokio::test]
    async fn an_unnoted_writer_goes_ahead_without_slicing_bulk_work() {
        let turn = Arc::new(Turn::default());
        let held = turn.take(false).await;
        let queued = |turn: &Arc<Turn>| {
            let turn = turn.clone();
            tokio::spawn(async move { drop(turn.take(false).await) })
        };
        // The first writer queued waits for the lock itself, the second
        // for its place in the queue.
        let (first, second) = (queued(&turn), queued(&turn));
        tokio::task::yield_now().await;
        let control = tokio::spawn({
            let turn = turn.clone();
            async move { turn.take_ahead_unnoted().await }
        });
        while !turn.ahead_waiting() {
            tokio::task::yield_now().await;
        }
        drop(held);
        let control_held = control.await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            !first.is_finished() && !second.is_finished(),
            "the control write went before every writer queued"
        );
        assert!(!turn.ahead_lately(), "bulk work is not sliced for it");
        drop(control_held);
        first.await.unwrap();
        second.await.unwrap();
    }

    /// Who took the turn, in order, of writers spawned one after the other.
    #[derive(Clone, Default)]
    struct Order(Arc<std::sync::Mutex<Vec<&'static str>>>);

    impl Order {
        fn writer(
            &self,
            turn: &Arc<Turn>,
            name: &'static str,
            ahead: bool,
            hold: Option<tokio::sync::oneshot::Receiver<()>>,
        ) -> tokio::task::JoinHandle<()> {
            let (turn, order) = (turn.clone(), self.clone());
            tokio::spawn(async move {
                let _held = turn.take(ahead).await;
                order.0.lock().unwrap().push(name);
                if let Some(hold) = hold {
                    let _ = hold.await;
                }
            })
        }

        fn taken(&self) -> Vec<&'static str> {
            self.0.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn a_writer_ahead_goes_before_the_writer_already_waiting_for_the_lock() {
        let (turn, order, held, bulk) = bulk_waiting_for_the_lock().await;
        let ahead = ahead_waiting_named(&turn, &order, "ahead", None).await;
        drop(held);
        ahead.await.unwrap();
        bulk.await.unwrap();
        assert_eq!(order.taken(), ["ahead", "bulk"]);
    }

    #[tokio::test]
    async fn a_writer_not_ahead_is_passed_over_once_per_take() {
        let (turn, order, held, bulk) = bulk_waiting_for_the_lock().await;
        let (release, hold) = tokio::sync::oneshot::channel();
        let first = ahead_waiting_named(&turn, &order, "first ahead", Some(hold)).await;
        drop(held);
        while order.taken().is_empty() {
            tokio::task::yield_now().await;
        }
        // The bulk writer queued again behind the first writer ahead; a
        // second one coming now waits behind it.
        let second = ahead_waiting_named(&turn, &order, "second ahead", None).await;
        release.send(()).unwrap();
        first.await.unwrap();
        bulk.await.unwrap();
        second.await.unwrap();
        assert_eq!(order.taken(), ["first ahead", "bulk", "second ahead"]);
    }

    /// A turn held by a writer, and a bulk writer ("bulk") waiting for its lock.
    async fn bulk_waiting_for_the_lock() -> (
        Arc<Turn>,
        Order,
        OwnedMutexGuard<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let turn = Arc::new(Turn::default());
        let order = Order::default();
        let held = turn.take(false).await;
        let bulk = order.writer(&turn, "bulk", false, None);
        tokio::task::yield_now().await;
        (turn, order, held, bulk)
    }

    /// A named writer ahead, once it is waiting for the turn.
    async fn ahead_waiting_named(
        turn: &Arc<Turn>,
        order: &Order,
        name: &'static str,
        hold: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> tokio::task::JoinHandle<()> {
        let waiting = turn.waiting_ahead.load(Ordering::Relaxed);
        let writer = order.writer(turn, name, true, hold);
        while turn.waiting_ahead.load(Ordering::Relaxed) == waiting {
            tokio::task::yield_now().await;
        }
        writer
    }

    #[tokio::test]
    async fn a_writer_ahead_that_gives_up_is_no_longer_waiting() {
        let turn = Arc::new(Turn::default());
        let _held = turn.take(false).await;
        let ahead = ahead_waiting(&turn).await;
        ahead.abort();
        let _ = ahead.await;
        assert!(!turn.ahead_waiting());
    }
}
