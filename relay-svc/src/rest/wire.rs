//! The JSON shapes both directions share: channels by name, content, RFC 3339
//! instants, and their conversion to and from the proto messages.

use chukei_proto::common::v1 as common;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Problem;
use crate::content::Channel;

/// A channel's number in the proto messages.
pub fn channel_number(channel: Channel) -> i32 {
    Channel::number(Some(channel)) as i32
}

/// The channel a proto number names; `None` for "the carrier's default".
pub fn channel(number: i32) -> Option<Channel> {
    Channel::from_number(i64::from(number))
}

/// What the terminal shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Content {
    pub text: String,
    /// Media for RCS rich cards and e-mail.
    #[serde(default)]
    pub media_url: String,
    /// The e-mail subject.
    #[serde(default)]
    pub subject: String,
    /// RCS suggested replies.
    #[serde(default)]
    pub suggested_replies: Vec<String>,
}

impl From<Content> for common::Content {
    fn from(content: Content) -> Self {
        Self {
            text: content.text,
            media_url: content.media_url,
            subject: content.subject,
            suggested_replies: content.suggested_replies,
        }
    }
}

/// An instant as RFC 3339 (UTC), from the proto's timestamp.
pub fn instant(at: Option<&prost_types::Timestamp>) -> Option<String> {
    let at = at?;
    jiff::Timestamp::new(at.seconds, at.nanos)
        .ok()
        .map(|t| t.to_string())
}

/// An RFC 3339 instant from the request, as the proto's timestamp.
pub fn parse_instant(field: &str, text: &str) -> Result<prost_types::Timestamp, Problem> {
    let at: jiff::Timestamp = text.parse().map_err(|_| {
        Problem::invalid(
            field,
            "must be an RFC 3339 instant, e.g. 2026-12-04T09:00:00Z",
        )
    })?;
    Ok(prost_types::Timestamp {
        seconds: at.as_second(),
        nanos: at.subsec_nanosecond(),
    })
}

/// Whole seconds as the proto's duration.
pub fn seconds(value: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// The proto's duration in whole seconds (rounded up).
pub fn whole_seconds(duration: Option<&prost_types::Duration>) -> Option<u64> {
    let d = duration?;
    Some((d.seconds.max(0) as u64) + u64::from(d.nanos > 0))
}
