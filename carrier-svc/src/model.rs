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
