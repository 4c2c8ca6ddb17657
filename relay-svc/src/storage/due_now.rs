//! Deliveries handed to the dispatchers with the commit that stores them.
//!
//! A plain targeted message's first attempts are written by a batch of
//! accepts (`accept_batch.rs`), and its carrier's priority dispatcher used
//! to learn of them from a wake-up and read them back: a due read of the
//! lane after every batch's commit, on a reader connection whose page cache
//! that very commit had emptied. In the statement log of `bench targeted`
//! that read was the largest statement of the path (~27 µs per message,
//! 0.9 ms a read), ahead of the messages' own `INSERT`. The batch knows
//! every column the read would give (the rows' ids come back from their
//! `INSERT`), so once its group has committed it hands them over here
//! instead, and the dispatcher sends them without reading.
//!
//! The database stays what every delivery is found in: a row handed over
//! here and lost (a dispatcher not running, a queue full, a stream that
//! restarted) is read at the lane's next read like any other, and a row
//! both read and handed over is sent once (`dispatch/stream.rs`).

use std::sync::{Arc, OnceLock};

use chukei_proto::window::Window;

use super::transfer::{DueDelivery, DueMessage};
use super::{Store, on_pool};
use crate::policy::WindowMode;
use crate::storage::MessagePlan;
use crate::targeting::NewMessage;

/// Who takes deliveries due at once as their commit lands: the carriers'
/// priority dispatchers (`dispatch::DispatchHandle`).
pub trait DueNowSink: Send + Sync {
    /// `deliveries` of `carrier_id`'s priority lane, committed, pending and
    /// due now (in no promised order: the stream sorts what it takes).
    fn due_now(&self, carrier_id: &str, deliveries: Vec<DueDelivery>);
}

/// The store's sink, set once when the dispatchers start.
#[derive(Default)]
pub(crate) struct DueNowSlot(OnceLock<Arc<dyn DueNowSink>>);

impl std::fmt::Debug for DueNowSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DueNowSlot")
            .field(&self.0.get().is_some())
            .finish()
    }
}

impl Store {
    /// Hands deliveries due at once to `sink` from now on (the first call
    /// wins; a store serves one set of dispatchers).
    pub fn hand_due_now_to(&self, sink: Arc<dyn DueNowSink>) {
        on_pool!(self, _pool, groups => {
            let _ = groups.due_now.0.set(sink);
        });
    }

    /// The sink deliveries due at once go to, when the dispatchers run.
    pub(super) fn due_now_sink(&self) -> Option<Arc<dyn DueNowSink>> {
        on_pool!(self, _pool, groups => groups.due_now.0.get().cloned())
    }
}

/// What a due read gives back of a message stored from `message` and
/// `plan` (`transfer.rs`, `DUE_MESSAGE_COLUMNS`): the same columns, as
/// `message_rows.rs` stores them.
pub(super) fn due_message(message: &NewMessage, plan: &MessagePlan) -> DueMessage {
    let content = &message.content;
    DueMessage {
        content: crate::targeting::Content {
            text: content.text.clone(),
            media_url: content.media_url.clone(),
            subject: content.subject.clone(),
            // Stored one per line, as a due read splits them.
            suggested_replies: super::stored_list(Some(&content.suggested_replies.join("\n"))),
        },
        expires_at: plan.expires_at,
        carrier_window: if plan.window_mode == WindowMode::AtCarrier {
            plan.window.as_ref().map(Window::encode)
        } else {
            None
        },
        single_attempt: plan.policy.at_most_one_attempt(),
        trace_parent: message.trace_parent.clone(),
    }
}

/// Whether a first attempt stored with `(not_before, window_close)` for a
/// message expiring at `expires_at` is one a due read at `now` returns (it
/// is pending, not waiting, exactly when its time has come).
pub(super) fn due_at(
    not_before: i64,
    window_close: Option<i64>,
    expires_at: i64,
    now: i64,
) -> bool {
    not_before <= now && window_close.is_none_or(|close| close > now) && expires_at > now
}
