//! Acquisition's domain types: what carriers report (receipts per delivery and
//! periodic per-message count reports) and the kinds of deduplicated event the
//! relay derives every count from.

use crate::targeting::Channel;

/// The kinds of row in the `events` table; each is recorded at most once per
/// message and user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    HandedOver,
    Delivered,
    Opened,
    Failed,
    /// Not delivered by the message's expiry (at the relay or the carrier).
    Expired,
    /// A channel tried was not supported by the person's terminal.
    Unsupported,
    /// Not sent at all: fatigue cap or attention budget.
    Skipped,
}

/// A `message_counts` kind that is not an event: deliveries deferred by a quiet period.
pub const DEFERRED_COUNT: i64 = 8;

/// A message's own events, in the events log with the person `''` and
/// the message's counts at the time (`detail`), for webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageEventKind {
    Accepted,
    /// Its recipients extracted (`matched` known).
    Expanded,
    /// Every matched person's first attempt handed to a carrier.
    HandedOver,
    /// Closed at its expiry: the counts are final.
    Completed,
}

impl MessageEventKind {
    pub const ALL: [Self; 4] = [
        Self::Accepted,
        Self::Expanded,
        Self::HandedOver,
        Self::Completed,
    ];

    pub fn number(self) -> i64 {
        match self {
            Self::Accepted => 11,
            Self::Expanded => 12,
            Self::HandedOver => 13,
            Self::Completed => 14,
        }
    }
}

impl EventKind {
    pub const fn number(self) -> i64 {
        match self {
            Self::HandedOver => 1,
            Self::Delivered => 2,
            Self::Opened => 3,
            Self::Failed => 4,
            Self::Expired => 5,
            Self::Unsupported => 6,
            Self::Skipped => 7,
        }
    }

    /// How explanations name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandedOver => "handed_over",
            Self::Delivered => "delivered",
            Self::Opened => "opened",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Unsupported => "unsupported",
            Self::Skipped => "skipped",
        }
    }

    pub fn from_number(number: i64) -> Option<Self> {
        match number {
            1 => Some(Self::HandedOver),
            2 => Some(Self::Delivered),
            3 => Some(Self::Opened),
            4 => Some(Self::Failed),
            5 => Some(Self::Expired),
            6 => Some(Self::Unsupported),
            7 => Some(Self::Skipped),
            _ => None,
        }
    }

    /// The events a receipt of this kind establishes: an open proves delivery,
    /// and delivery proves hand-over.
    pub fn implied(self) -> &'static [Self] {
        match self {
            Self::HandedOver => &[Self::HandedOver],
            Self::Delivered => &[Self::HandedOver, Self::Delivered],
            Self::Opened => &[Self::HandedOver, Self::Delivered, Self::Opened],
            Self::Failed => &[Self::HandedOver, Self::Failed],
            Self::Expired => &[Self::HandedOver, Self::Expired],
            Self::Unsupported => &[Self::HandedOver, Self::Unsupported],
            Self::Skipped => &[Self::Skipped],
        }
    }
}

/// One receipt from a carrier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The attempt it is about (the relay's delivery row id); absent from old carriers.
    pub delivery_id: Option<i64>,
    pub message_id: String,
    pub user_id: String,
    pub kind: EventKind,
    pub channel: Option<Channel>,
    pub at: i64,
    /// Where the terminal was, as a region path; empty when unknown.
    pub region: String,
}

/// A carrier's own per-message counts at one time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountReport {
    pub at: i64,
    pub counts: Vec<MessageCount>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageCount {
    pub message_id: String,
    pub sent: u64,
    pub opened: u64,
    pub sms_segments: u64,
    pub unsupported: u64,
    pub expired: u64,
}
