//! The carrier's domain types. Subscriber records hold personal data: they are
//! never logged, and only consented attributes ever leave the carrier.

/// `chukei.common.v1.Channel` values.
pub const CHANNEL_RCS: i64 = 1;
pub const CHANNEL_SMS: i64 = 2;
pub const CHANNEL_SNS: i64 = 3;
pub const CHANNEL_EMAIL: i64 = 4;

/// A subscriber as provisioned by the carrier's operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    pub user_id: String,
    pub phone_number: String,
    pub name: String,
    /// `chukei.common.v1.Gender` value.
    pub gender: i32,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    pub region: String,
    pub occupation: String,
    pub primary: bool,
    /// Empty: not reachable by e-mail.
    pub email: String,
    /// Empty: not reachable on SNS.
    pub sns_handle: String,
}

/// One message's deliveries in a batch from the relay: what they share,
/// once, and each recipient's own few columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageDeliveries {
    pub message_id: String,
    pub text: String,
    pub media_url: String,
    pub subject: String,
    pub suggested_replies: Vec<String>,
    pub expires_at: i64,
    /// The window in its stored form, when the relay asked the carrier to hold for it.
    pub window: Option<String>,
    /// Each delivery is its person's only attempt here (counted directly).
    pub single_attempt: bool,
    /// The message's trace at this carrier (W3C traceparent; empty: not traced).
    pub trace_parent: String,
    /// A targeted message's: pushed before held campaign deliveries.
    pub priority: bool,
    pub recipients: Vec<Recipient>,
}

/// One delivery of a [`MessageDeliveries`]: whom, on which channel, from when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The relay's delivery id (unique in the hub).
    pub delivery_id: u64,
    pub user_id: String,
    /// `chukei.common.v1.Channel` value; never unspecified once accepted.
    pub channel: i64,
    pub not_before: i64,
}

/// Where a delivery is kept: its batch row and its place in the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub row: i64,
    pub index: u32,
}

/// The subscriber details the adapters need (never logged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contact {
    pub email: String,
    pub sns_handle: String,
    /// Filled only for a delivery handed to an SMSC.
    pub phone_number: String,
}

/// A set of channels (`chukei.common.v1.Channel` values): those a gateway
/// serves instead of the terminals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelSet(u8);

impl ChannelSet {
    pub const EMPTY: Self = Self(0);

    pub fn with(self, channel: i64) -> Self {
        Self(self.0 | Self::bit(channel))
    }

    pub fn contains(self, channel: i64) -> bool {
        self.0 & Self::bit(channel) != 0
    }

    fn bit(channel: i64) -> u8 {
        if (0..8).contains(&channel) {
            1 << channel
        } else {
            0
        }
    }
}

/// Which of the held batches' two lanes a read looks at: the targeted
/// messages' (priority) and the campaigns'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lanes {
    pub priority: bool,
    pub bulk: bool,
}

impl Lanes {
    pub const BOTH: Self = Self {
        priority: true,
        bulk: true,
    };
    pub const PRIORITY: Self = Self {
        priority: true,
        bulk: false,
    };
    pub const BULK: Self = Self {
        priority: false,
        bulk: true,
    };

    pub fn any(self) -> bool {
        self.priority || self.bulk
    }

    pub fn or(self, other: Self) -> Self {
        Self {
            priority: self.priority || other.priority,
            bulk: self.bulk || other.bulk,
        }
    }

    pub fn and(self, other: Self) -> Self {
        Self {
            priority: self.priority && other.priority,
            bulk: self.bulk && other.bulk,
        }
    }
}

/// A delivery on its way to a terminal, with what its channel adapter needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub slot: Slot,
    pub delivery_id: u64,
    pub message_id: String,
    pub user_id: String,
    pub channel: i64,
    pub text: String,
    pub media_url: String,
    pub subject: String,
    pub suggested_replies: Vec<String>,
    pub contact: Contact,
    pub trace_parent: String,
}

/// What a terminal said happened to a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TerminalEventKind {
    /// Delivered or displayed.
    Delivered,
    Read,
    /// The terminal cannot show this channel.
    Unsupported,
    /// The network refused it or reported it undeliverable (gateways only).
    Failed,
    /// A mail the server had accepted came back: failed even if delivered.
    Bounced,
}

/// What a terminal reported about one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalEvent {
    pub delivery_id: u64,
    pub message_id: String,
    pub kind: TerminalEventKind,
    pub at: i64,
    pub region: String,
    /// The event's place in its message's trace, passed on with the receipt.
    pub trace_parent: String,
}

/// `chukei.common.v1.ReceiptKind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptKind {
    Delivered = 1,
    Opened = 2,
    Failed = 3,
    Unsupported = 4,
    Expired = 5,
}

impl ReceiptKind {
    pub fn from_number(number: i64) -> Self {
        match number {
            2 => Self::Opened,
            3 => Self::Failed,
            4 => Self::Unsupported,
            5 => Self::Expired,
            _ => Self::Delivered,
        }
    }
}

/// A receipt waiting in the outbox for the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The outbox row it was queued in (receipts queued together share one).
    pub seq: i64,
    /// 0: not tied to one delivery.
    pub delivery_id: u64,
    pub message_id: String,
    pub user_id: String,
    pub kind: ReceiptKind,
    pub channel: i64,
    pub at: i64,
    pub region: String,
    pub trace_parent: String,
}

// Gateways (`crate::gateways`): what a network answers and reports.

/// What a network answered for one delivery handed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handed {
    /// Taken: the ids it gave, one per part (an SMS of three parts has three).
    Accepted(Vec<String>),
    /// Taken and thereby delivered as far as the network tells (a mail
    /// server's 2xx), under these ids.
    Delivered(Vec<String>),
    /// Refused for good: a FAILED receipt, with the network's words (an
    /// SMPP status, an SMTP reply) kept at the carrier.
    Refused(String),
    /// Not now (throttled, queue full, not connected): held, tried again.
    Later(String),
}

/// What a network later said about one of its ids (gateways only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Delivered = 1,
    Failed = 2,
    Read = 3,
    /// A mail the server had accepted came back: a failure even after
    /// its delivery.
    Bounced = 4,
}

/// The forms an id may come back in: as given (lower case, leading zeros
/// dropped), and, when it reads as a number, the same number in the other
/// base — SMSCs answer `submit_sm` in hex and report in decimal, or the
/// other way round (Jasmin #643). The first form is the id as given.
pub fn id_forms(id: &str) -> Vec<String> {
    let id = id.trim().to_ascii_lowercase();
    let trimmed = id.trim_start_matches('0');
    let given = if trimmed.is_empty() && !id.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    };
    let mut forms = vec![given.clone()];
    if given.is_empty() || given.len() > 30 {
        return forms;
    }
    if given.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(value) = given.parse::<u128>() {
            forms.push(format!("{value:x}"));
        }
    }
    if given.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(value) = u128::from_str_radix(&given, 16) {
            forms.push(value.to_string());
        }
    }
    forms.dedup();
    forms
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Read => "read",
            Self::Bounced => "bounced",
        }
    }
}

/// A network's report as the carrier keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkReport {
    /// The id the network gave (in whichever base it now names it).
    pub external_id: String,
    pub outcome: Outcome,
    /// The network's words for a failure (never personal data).
    pub error: String,
    /// When it happened (unix ms); 0: when it arrived.
    pub at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_in_hex_and_in_decimal() {
        assert_eq!(id_forms("0001F4"), vec!["1f4", "500"]);
        assert_eq!(id_forms("500"), vec!["500", "1f4", "1280"]);
        assert_eq!(id_forms("ABCDEF"), vec!["abcdef", "11259375"]);
        assert_eq!(id_forms("000"), vec!["0"]);
        // Not a number in either base: only as given.
        let uuid = "3c1e4a7e-1b2c-4d5e-8f90-123456789abc";
        assert_eq!(id_forms(uuid), vec![uuid]);
    }
}
