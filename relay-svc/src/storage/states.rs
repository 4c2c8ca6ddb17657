//! The states a delivery attempt and a message move through, and the two
//! lanes of a carrier's queue, as they are stored: numbers spliced into the
//! SQL text by name (`formatcp!("… state = {PENDING} …")`), so the text a
//! partial index was made for still matches it, and each has one name.

use const_format::formatcp;

/// Where one delivery attempt stands (`deliveries.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    /// May go now: the carrier's dispatcher reads it.
    Pending,
    /// The carrier acknowledged the batch that held it.
    HandedOver,
    /// The terminal does not support its channel.
    Unsupported,
    /// Its message expired before it reached the terminal.
    Expired,
    /// The person opened another attempt of the message.
    Cancelled,
    /// Not sent, for the reason in its note (fatigue, consent withdrawn, …).
    Skipped,
    /// Held until `not_before` (a window, a quiet period, a send time).
    Waiting,
}

impl DeliveryState {
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::HandedOver,
        Self::Unsupported,
        Self::Expired,
        Self::Cancelled,
        Self::Skipped,
        Self::Waiting,
    ];

    /// The stored number.
    pub const fn number(self) -> i64 {
        match self {
            Self::Pending => 0,
            Self::HandedOver => 1,
            Self::Unsupported => 2,
            Self::Expired => 3,
            Self::Cancelled => 4,
            Self::Skipped => 5,
            Self::Waiting => 6,
        }
    }

    pub fn from_number(number: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.number() == number)
    }

    /// The name an explanation shows.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::HandedOver => "handed_over",
            Self::Unsupported => "unsupported",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
            Self::Waiting => "waiting",
        }
    }
}

pub(crate) const PENDING: i64 = DeliveryState::Pending.number();
pub(crate) const HANDED_OVER: i64 = DeliveryState::HandedOver.number();
pub(crate) const UNSUPPORTED: i64 = DeliveryState::Unsupported.number();
pub(crate) const EXPIRED: i64 = DeliveryState::Expired.number();
pub(crate) const CANCELLED: i64 = DeliveryState::Cancelled.number();
pub(crate) const SKIPPED: i64 = DeliveryState::Skipped.number();
pub(crate) const WAITING: i64 = DeliveryState::Waiting.number();
/// Attempts not yet handed over: `state IN {UNSENT}`.
pub(crate) const UNSENT: &str = formatcp!("({PENDING}, {WAITING})");
/// Attempts the carrier may still hold or be offered: `state IN {OPEN}`.
pub(crate) const OPEN: &str = formatcp!("({PENDING}, {HANDED_OVER})");

/// A message's stored state (`messages.state`; see `MessageState`).
pub(crate) const ACCEPTED: i64 = crate::targeting::MessageState::Accepted as i64;
pub(crate) const EXPANDED: i64 = crate::targeting::MessageState::Expanded as i64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_the_stored_ones_and_round_trip() {
        let numbers: Vec<i64> = DeliveryState::ALL.iter().map(|s| s.number()).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4, 5, 6]);
        for state in DeliveryState::ALL {
            assert_eq!(DeliveryState::from_number(state.number()), Some(state));
        }
        assert_eq!(UNSENT, "(0, 6)");
        assert_eq!((ACCEPTED, EXPANDED), (1, 2));
        assert_eq!(super::super::Lane::Priority as i64, 0);
    }
}
