//! Deliveries handed to the priority dispatchers by the accepts that
//! stored them (`storage::DueNowSink`, `storage/due_now.rs`): one queue per
//! carrier whose priority stream runs on this replica, so a targeted
//! message goes down its stream without being read back from the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::storage::DueDelivery;

/// At most this many deliveries wait in one carrier's queue (its stream
/// slow or stalled); more are left to the lane's next read.
const MOST_QUEUED: usize = 10_000;

/// The queues of the priority streams open on this replica, by carrier.
#[derive(Debug, Default)]
pub(super) struct HandedLanes {
    lanes: Mutex<HashMap<String, Arc<Handed>>>,
}

/// One priority stream's queue of handed deliveries.
#[derive(Debug, Default)]
pub(super) struct Handed {
    queue: Mutex<Vec<DueDelivery>>,
    /// Deliveries were added (or left out): the stream takes them.
    pub(super) arrived: Notify,
    /// Some were left out, the queue being full: the lane is read again.
    overflowed: AtomicBool,
}

impl Handed {
    /// What waits, and whether some were left out since the last take.
    pub(super) fn take(&self) -> (Vec<DueDelivery>, bool) {
        let due = std::mem::take(&mut *self.queue.lock().expect("not poisoned"));
        (due, self.overflowed.swap(false, Ordering::Relaxed))
    }
}

impl HandedLanes {
    /// A priority stream of `carrier_id` opens: its queue from now on,
    /// replacing any earlier stream's. Deliveries handed before are read
    /// from the database, as a new stream starts its lane from the lowest.
    pub(super) fn open(self: &Arc<Self>, carrier_id: &str) -> OpenLane {
        let handed = Arc::new(Handed::default());
        self.lanes
            .lock()
            .expect("not poisoned")
            .insert(carrier_id.to_owned(), handed.clone());
        OpenLane {
            lanes: self.clone(),
            carrier_id: carrier_id.to_owned(),
            handed,
        }
    }

    /// Queues `deliveries` for `carrier_id`'s priority stream; false when
    /// no such stream runs here.
    pub(super) fn give(&self, carrier_id: &str, deliveries: Vec<DueDelivery>) -> bool {
        let Some(handed) = self
            .lanes
            .lock()
            .expect("not poisoned")
            .get(carrier_id)
            .cloned()
        else {
            return false;
        };
        {
            let mut queue = handed.queue.lock().expect("not poisoned");
            if queue.len() + deliveries.len() > MOST_QUEUED {
                handed.overflowed.store(true, Ordering::Relaxed);
            } else {
                queue.extend(deliveries);
            }
        }
        handed.arrived.notify_one();
        true
    }
}

/// A priority stream's place among the [`HandedLanes`], given up when the
/// stream ends (dropped).
pub(super) struct OpenLane {
    lanes: Arc<HandedLanes>,
    carrier_id: String,
    pub(super) handed: Arc<Handed>,
}

impl Drop for OpenLane {
    fn drop(&mut self) {
        let mut lanes = self.lanes.lanes.lock().expect("not poisoned");
        if lanes
            .get(&self.carrier_id)
            .is_some_and(|open| Arc::ptr_eq(open, &self.handed))
        {
            lanes.remove(&self.carrier_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::HandedLanes;
    use crate::storage::{DueDelivery, DueMessage};
    use crate::targeting::Content;

    fn delivery(id: i64) -> DueDelivery {
        DueDelivery {
            id,
            message_id: "msg-1".into(),
            user_id: "user-1".into(),
            channel: None,
            not_before: 0,
            message: Arc::new(DueMessage {
                content: Content::default(),
                expires_at: 1,
                carrier_window: None,
                single_attempt: true,
                trace_parent: String::new(),
            }),
        }
    }

    #[test]
    fn deliveries_wait_only_for_a_stream_that_runs_here() {
        let lanes = Arc::new(HandedLanes::default());
        assert!(!lanes.give("alpha", vec![delivery(1)]), "no stream yet");
        let open = lanes.open("alpha");
        assert!(lanes.give("alpha", vec![delivery(2), delivery(3)]));
        let (due, overflowed) = open.handed.take();
        assert_eq!(due.iter().map(|d| d.id).collect::<Vec<_>>(), [2, 3]);
        assert!(!overflowed);
        drop(open);
        assert!(!lanes.give("alpha", vec![delivery(4)]), "the stream ended");
    }

    #[test]
    fn a_full_queue_leaves_deliveries_to_the_next_read() {
        let lanes = Arc::new(HandedLanes::default());
        let open = lanes.open("alpha");
        let many: Vec<_> = (0..super::MOST_QUEUED as i64).map(delivery).collect();
        assert!(lanes.give("alpha", many));
        assert!(lanes.give("alpha", vec![delivery(-1)]));
        let (due, overflowed) = open.handed.take();
        assert_eq!(due.len(), super::MOST_QUEUED);
        assert!(overflowed, "the one left out is read from the database");
        assert!(!open.handed.take().1, "said once");
    }

    #[test]
    fn a_stream_replaced_keeps_the_new_ones_queue() {
        let lanes = Arc::new(HandedLanes::default());
        let first = lanes.open("alpha");
        let second = lanes.open("alpha");
        drop(first);
        assert!(lanes.give("alpha", vec![delivery(5)]));
        assert_eq!(second.handed.take().0.len(), 1);
    }
}
