//! What a message says and the channel it goes on: the leaf types both the
//! request (`targeting`) and delivery control (`policy`) are built from.

// On a message, no channel (`None`) means the carrier's default.
/// The channel a carrier should use: `rcs`, `sms`, `sns` or `email` (by name in
/// the REST edge's JSON).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Rcs,
    Sms,
    Sns,
    Email,
}

impl Channel {
    /// Stored and wire number (the proto enum's value).
    pub fn number(channel: Option<Self>) -> i64 {
        match channel {
            None => 0,
            Some(Self::Rcs) => 1,
            Some(Self::Sms) => 2,
            Some(Self::Sns) => 3,
            Some(Self::Email) => 4,
        }
    }

    pub fn from_number(number: i64) -> Option<Self> {
        match number {
            1 => Some(Self::Rcs),
            2 => Some(Self::Sms),
            3 => Some(Self::Sns),
            4 => Some(Self::Email),
            _ => None,
        }
    }
}

/// What is shown on the terminal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Content {
    pub text: String,
    pub media_url: String,
    /// E-mail only.
    pub subject: String,
    /// RCS only.
    pub suggested_replies: Vec<String>,
}
