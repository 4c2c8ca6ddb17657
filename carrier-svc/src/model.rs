//! The carrier's domain types. Subscriber records hold personal data: they are
//! never logged, and only consented attributes ever leave the carrier.

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
}

/// A delivery received from the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub delivery_id: String,
    pub message_id: String,
    pub user_id: String,
    /// `chukei.common.v1.Channel` value; never unspecified once accepted.
    pub channel: i64,
    pub text: String,
    pub media_url: String,
    pub not_before: i64,
    pub expires_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    Held = 0,
}

/// A delivery on its way to a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: i64,
    pub delivery_id: String,
    pub message_id: String,
    pub user_id: String,
    pub channel: i64,
    pub text: String,
    pub media_url: String,
}

/// What a terminal reported about one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminalEvent {
    pub delivery_id: String,
    /// Read (opened); otherwise delivered/displayed.
    pub read: bool,
    pub at: i64,
    pub region: String,
}

/// `chukei.common.v1.ReceiptKind` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptKind {
    Delivered = 1,
    Opened = 2,
    Failed = 3,
}

impl ReceiptKind {
    pub fn from_number(number: i64) -> Self {
        match number {
            2 => Self::Opened,
            3 => Self::Failed,
            _ => Self::Delivered,
        }
    }
}

/// A receipt waiting in the outbox for the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: i64,
    pub message_id: String,
    pub user_id: String,
    pub kind: ReceiptKind,
    pub channel: i64,
    pub at: i64,
    pub region: String,
}
