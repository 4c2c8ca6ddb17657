//! What an enterprise asks for when it sends: the message, its target, its
//! instructions — validated domain types built at the gRPC edge.
//!
//! Extraction itself (turning a target into recipients) is one set-based
//! statement in `storage::messages`; this module owns the rules about what a
//! valid target is and the message's fingerprint for idempotency.

use sha2::{Digest, Sha256};

pub use crate::content::{Channel, Content};
use crate::policy::{FollowUp, Policy, Priority, Timing, WindowMode};
use crate::registry::Gender;

/// The longest text a message may carry (bytes).
pub const MAX_TEXT_BYTES: usize = 8_192;
/// The most refs one `SendMessage` may name.
pub const MAX_REFS: usize = 10_000;

/// Who a message is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Specific users, by this enterprise's refs (deduplicated, in order).
    Refs(Vec<String>),
    AllRegistered,
    Service(String),
    Segment(Segment),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refs(_) => "refs",
            Self::AllRegistered => "all",
            Self::Service(_) => "service",
            Self::Segment(_) => "segment",
        }
    }
}

/// An attribute segment over consented profiles; every given criterion must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub gender: Option<Gender>,
    /// Inclusive; a profile matches when its whole age range lies inside.
    pub age: Option<(u32, u32)>,
    /// Any of these; a region matches itself and everything below it.
    pub regions: Vec<String>,
    /// Any of these.
    pub occupations: Vec<String>,
    pub service_id: Option<String>,
}

impl Segment {
    /// The attributes the segment reads, by name (what the audit log keeps).
    pub fn fields(&self) -> String {
        let mut fields = Vec::new();
        if self.gender.is_some() {
            fields.push("gender");
        }
        if self.age.is_some() {
            fields.push("age");
        }
        if !self.regions.is_empty() {
            fields.push("region");
        }
        if !self.occupations.is_empty() {
            fields.push("occupation");
        }
        fields.join(",")
    }

    pub fn has_criteria(&self) -> bool {
        self.gender.is_some()
            || self.age.is_some()
            || !self.regions.is_empty()
            || !self.occupations.is_empty()
    }
}

/// A validated `SendMessage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub idempotency_key: String,
    pub target: Target,
    pub content: Content,
    pub policy: Policy,
    pub all_carriers: bool,
    pub timing: Timing,
    pub follow_up: Option<FollowUp>,
    pub priority: Priority,
    /// A winning bid whose capacity the message draws on.
    pub bid_id: Option<String>,
    /// The W3C traceparent of the accepting call (empty: not traced); not
    /// part of what a retry must repeat.
    pub trace_parent: String,
}

impl NewMessage {
    /// A digest of everything but the idempotency key: a retry with the same key
    /// must carry the same fingerprint. Built from an explicit canonical form so
    /// it stays stable across releases.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |name: &str, value: &str| {
            hasher.update(name.as_bytes());
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        };
        field("target", self.target.kind());
        match &self.target {
            Target::Refs(refs) => refs.iter().for_each(|r| field("ref", r)),
            Target::AllRegistered => {}
            Target::Service(service) => field("service", service),
            Target::Segment(segment) => {
                field("gender", segment.gender.map_or("", Gender::as_str));
                if let Some((min, max)) = segment.age {
                    field("age", &format!("{min}-{max}"));
                }
                segment.regions.iter().for_each(|r| field("region", r));
                segment
                    .occupations
                    .iter()
                    .for_each(|o| field("occupation", o));
                field("service", segment.service_id.as_deref().unwrap_or(""));
            }
        }
        fn content(field: &mut dyn FnMut(&str, &str), prefix: &str, content: &Content) {
            field(&format!("{prefix}text"), &content.text);
            field(&format!("{prefix}media"), &content.media_url);
            field(&format!("{prefix}subject"), &content.subject);
            content
                .suggested_replies
                .iter()
                .for_each(|r| field(&format!("{prefix}reply"), r));
        }
        content(&mut field, "", &self.content);
        field("policy", self.policy.kind.as_str());
        for channel in &self.policy.channels {
            field("channel", &Channel::number(Some(*channel)).to_string());
        }
        field("timeout", &self.policy.timeout_ms.to_string());
        field("resends", &self.policy.max_resends.to_string());
        field(
            "until_delivered",
            if self.policy.resend_until_delivered {
                "1"
            } else {
                "0"
            },
        );
        field("all_carriers", if self.all_carriers { "1" } else { "0" });
        if let Some(window) = &self.timing.window {
            field("window", &window.encode());
        }
        field(
            "window_mode",
            match self.timing.mode {
                WindowMode::HeldAtRelay => "relay",
                WindowMode::AtCarrier => "carrier",
            },
        );
        if let Some(expires_at) = self.timing.expires_at {
            field("expires_at", &expires_at.to_string());
        }
        if let Some(send_time) = self.timing.send_time {
            field("send_time", &send_time.encode());
        }
        if let Some(follow_up) = &self.follow_up {
            content(&mut field, "follow_up.", &follow_up.content);
            field("follow_up.delay", &follow_up.delay_ms.to_string());
            field(
                "follow_up.channel",
                &Channel::number(follow_up.channel).to_string(),
            );
        }
        field("priority", &self.priority.number().to_string());
        if let Some(bid_id) = &self.bid_id {
            field("bid", bid_id);
        }
        hex::encode(hasher.finalize())
    }
}

/// A message's lifecycle; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MessageState {
    Accepted = 1,
    Expanded = 2,
    HandedOver = 3,
}

impl MessageState {
    pub fn from_number(number: i64) -> Self {
        match number {
            3 => Self::HandedOver,
            2 => Self::Expanded,
            _ => Self::Accepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> NewMessage {
        NewMessage {
            idempotency_key: "k".into(),
            target: Target::Refs(vec!["a".into(), "b".into()]),
            content: Content {
                text: text.into(),
                ..Content::default()
            },
            policy: Policy::fixed(Some(Channel::Sms)),
            all_carriers: false,
            timing: Timing::default(),
            follow_up: None,
            priority: Priority::Normal,
            bid_id: None,
            trace_parent: String::new(),
        }
    }

    #[test]
    fn fingerprint_ignores_the_key_and_sees_the_body() {
        let mut other_key = message("hi");
        other_key.idempotency_key = "other".into();
        assert_eq!(message("hi").fingerprint(), other_key.fingerprint());
        assert_ne!(message("hi").fingerprint(), message("hi!").fingerprint());
    }

    #[test]
    fn fingerprint_separates_field_boundaries() {
        let mut a = message("x");
        a.target = Target::Refs(vec!["ab".into()]);
        let mut b = message("x");
        b.target = Target::Refs(vec!["a".into(), "b".into()]);
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
