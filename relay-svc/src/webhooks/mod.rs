//! Status webhooks: what happened to each person a message went to, pushed
//! to the enterprise's own URLs instead of polled.
//!
//! The events log (`events`, the same log the rollup fold reads) is the
//! outbox: each endpoint keeps a cursor in it, so nothing is written per
//! event for a webhook, and a batch of events is one POST. A batch is fixed
//! before its first attempt (its end in the log and its webhook id), so a
//! retry sends the same body under the same id; the cursor moves past it
//! only when the endpoint answered 2xx. Events of one message are numbered
//! per endpoint (`sequence`: 1, 2, 3… without gaps, in the order they
//! happened), and a person's events come in funnel order — handed over,
//! delivered, opened — because the log holds them in that order.
//!
//! Requests are signed as the Standard Webhooks specification says
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256 of "id.timestamp.body">` with a `whsec_` secret); while a
//! rotated-out secret is still valid both sign. This module is the pure
//! part — event types, payloads, signatures, the retry schedule, which
//! addresses may be called; `sender.rs` delivers.

pub mod sender;

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::receipts::{EventKind, MessageEventKind};

/// What an endpoint may be sent: one type per kind of event in the log —
/// a person's (`recipient.*`) or the message's own (`message.*`, with its
/// counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    /// The person's carrier took the message.
    #[serde(rename = "recipient.handed_over")]
    HandedOver,
    /// It reached the person's terminal.
    #[serde(rename = "recipient.delivered")]
    Delivered,
    /// The person opened it.
    #[serde(rename = "recipient.opened")]
    Opened,
    #[serde(rename = "recipient.failed")]
    Failed,
    /// Not delivered before the message expired.
    #[serde(rename = "recipient.expired")]
    Expired,
    /// The person's terminal does not support the channel tried.
    #[serde(rename = "recipient.unsupported")]
    Unsupported,
    /// Not sent: the person's fatigue cap or the hub's attention budget.
    #[serde(rename = "recipient.skipped")]
    Skipped,
    /// The message was accepted.
    #[serde(rename = "message.accepted")]
    MessageAccepted,
    /// Its recipients were extracted (`counts.matched`).
    #[serde(rename = "message.expanded")]
    MessageExpanded,
    /// Every matched person's first attempt reached a carrier.
    #[serde(rename = "message.handed_over")]
    MessageHandedOver,
    /// It closed at its expiry: the counts are final.
    #[serde(rename = "message.completed")]
    MessageCompleted,
}

impl EventType {
    pub const ALL: [Self; 11] = [
        Self::HandedOver,
        Self::Delivered,
        Self::Opened,
        Self::Failed,
        Self::Expired,
        Self::Unsupported,
        Self::Skipped,
        Self::MessageAccepted,
        Self::MessageExpanded,
        Self::MessageHandedOver,
        Self::MessageCompleted,
    ];

    /// The kind of event in the log this type reports.
    pub fn number(self) -> i64 {
        match self {
            Self::HandedOver => EventKind::HandedOver.number(),
            Self::Delivered => EventKind::Delivered.number(),
            Self::Opened => EventKind::Opened.number(),
            Self::Failed => EventKind::Failed.number(),
            Self::Expired => EventKind::Expired.number(),
            Self::Unsupported => EventKind::Unsupported.number(),
            Self::Skipped => EventKind::Skipped.number(),
            Self::MessageAccepted => MessageEventKind::Accepted.number(),
            Self::MessageExpanded => MessageEventKind::Expanded.number(),
            Self::MessageHandedOver => MessageEventKind::HandedOver.number(),
            Self::MessageCompleted => MessageEventKind::Completed.number(),
        }
    }

    pub fn from_kind(kind: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.number() == kind)
    }

    /// The name on the wire, e.g. `recipient.opened`.
    pub fn name(self) -> &'static str {
        match self {
            Self::HandedOver => "recipient.handed_over",
            Self::Delivered => "recipient.delivered",
            Self::Opened => "recipient.opened",
            Self::Failed => "recipient.failed",
            Self::Expired => "recipient.expired",
            Self::Unsupported => "recipient.unsupported",
            Self::Skipped => "recipient.skipped",
            Self::MessageAccepted => "message.accepted",
            Self::MessageExpanded => "message.expanded",
            Self::MessageHandedOver => "message.handed_over",
            Self::MessageCompleted => "message.completed",
        }
    }

    /// The type named `name` on the wire, e.g. `recipient.opened`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The types stored as bits (one per kind number).
    pub fn bits(types: &[Self]) -> i64 {
        types.iter().fold(0, |bits, t| bits | 1 << t.number())
    }

    pub fn from_bits(bits: i64) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|t| bits & 1 << t.number() != 0)
            .collect()
    }
}

/// A message's counts when one of its `message.*` events happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Counts {
    pub matched: u64,
    pub handed_over: u64,
    pub delivered: u64,
    pub opened: u64,
    pub failed: u64,
    pub expired: u64,
    pub unsupported: u64,
    pub skipped: u64,
    /// Deferred by a quiet period.
    pub deferred: u64,
}

/// One event as the endpoint receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Stable: the same on every retry and every endpoint; de-duplicate on it.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub message_id: String,
    /// The person, by the ref the enterprise knows them by (`recipient.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ref: Option<String>,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    /// 1, 2, 3… per message on this endpoint, without gaps, in the order the
    /// events happened.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::content::Channel>,
    /// The message's counts then (`message.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Counts>,
}

/// The body of one POST: a batch of events.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Payload {
    /// Always `events.batch`.
    #[serde(rename = "type")]
    pub payload_type: String,
    /// When the newest event of the batch happened (RFC 3339): the same on
    /// every retry, like the body.
    pub timestamp: String,
    pub data: Vec<Event>,
}

/// An event's stable id: from what identifies it — the message, the person
/// (by the ref the enterprise already knows; `""` for the message's own)
/// and the kind — so a retry, a replay or a second endpoint carries the
/// same id.
pub fn event_id(message_id: &str, user_ref: &str, event_type: EventType) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(
        format!("{message_id}\u{1f}{user_ref}\u{1f}{}", event_type.name()).as_bytes(),
    );
    format!("evt_{}", hex::encode(&digest[..16]))
}

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> Result<String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| Error::Internal(anyhow::anyhow!("random: {e}")))?;
    Ok(format!("whsec_{}", BASE64.encode(key)))
}

/// `webhook-signature`'s value: `v1,<base64 signature>` per secret, space
/// separated (several while a rotated-out secret is still valid).
pub fn signature(secrets: &[&str], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|secret| {
            let key = BASE64
                .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
                .ok()?;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
            mac.update(webhook_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            Some(format!(
                "v1,{}",
                BASE64.encode(mac.finalize().into_bytes().as_slice())
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long to wait before each retry of a failed batch: the first entry
/// after the first failure, the last entry for every failure past the end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule(pub Vec<Duration>);

impl Default for RetrySchedule {
    /// 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, then every 24 h.
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        Self(vec![
            Duration::from_secs(5),
            minutes(5),
            minutes(30),
            minutes(120),
            minutes(300),
            minutes(600),
            minutes(1440),
        ])
    }
}

impl RetrySchedule {
    /// The wait after `failures` failed attempts in a row (at least one),
    /// or longer when the endpoint asked (`Retry-After`), up to a day.
    pub fn after(&self, failures: u64, retry_after: Option<Duration>) -> Duration {
        let index = (failures.max(1) - 1) as usize;
        let scheduled = self
            .0
            .get(index)
            .or(self.0.last())
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let asked = retry_after.map_or(Duration::ZERO, |d| d.min(Duration::from_secs(86_400)));
        scheduled.max(asked)
    }
}

impl std::str::FromStr for RetrySchedule {
    type Err = String;

    /// A comma-separated list of durations: `5s,5m,30m,2h,5h,10h,24h`
    /// (units ms, s, m, h, d).
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let mut waits = Vec::new();
        for part in text.split(',').map(str::trim) {
            let split = part
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("{part:?}: a number and a unit (ms, s, m, h, d)"))?;
            let (number, unit) = part.split_at(split);
            let number: u64 = number
                .parse()
                .map_err(|_| format!("{part:?}: not a number"))?;
            let millis = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(format!("{part:?}: the unit is ms, s, m, h or d")),
            };
            waits.push(Duration::from_millis(number.saturating_mul(millis)));
        }
        if waits.is_empty() || waits.iter().any(Duration::is_zero) {
            return Err("at least one wait, each longer than zero".to_owned());
        }
        Ok(Self(waits))
    }
}

/// Checks an endpoint's URL: http or https, a host, no credentials in it,
/// at most 2,000 characters.
pub fn check_url(url: &str) -> Result<Target> {
    let invalid = |reason: &str| Error::invalid("url", reason);
    if url.len() > 2_000 {
        return Err(invalid("at most 2000 characters"));
    }
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(invalid("must start with https:// or http://"));
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(invalid("must not carry credentials"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("must not contain spaces or control characters"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            if host.contains(':') && !host.starts_with('[') {
                (authority, None)
            } else {
                let port: u16 = port
                    .parse()
                    .map_err(|_| invalid("the port is not a number"))?;
                (host, Some(port))
            }
        }
        _ => (authority, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("has no host"));
    }
    Ok(Target {
        tls,
        host: host.to_owned(),
        port: port.unwrap_or(if tls { 443 } else { 80 }),
        path: if path.is_empty() {
            "/".to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        },
    })
}

/// Where a URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

/// Whether an address is one an enterprise's endpoint must not point to
/// (loopback, private, link-local, shared, unspecified, multicast,
/// documentation), unless the operator allows it: a webhook must not become
/// a way into the operator's own network (server-side request forgery).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_example() {
        // The specification's own example (standard-webhooks/spec,
        // "Verifying signatures").
        let body = br#"{"test": 2432232314}"#;
        let signature = signature(
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn types_round_trip_through_bits() {
        let some = [EventType::Delivered, EventType::Opened];
        assert_eq!(EventType::from_bits(EventType::bits(&some)), some);
        assert_eq!(
            EventType::from_bits(EventType::bits(&EventType::ALL)),
            EventType::ALL
        );
        for t in EventType::ALL {
            assert_eq!(EventType::from_name(t.name()), Some(t));
            assert_eq!(
                serde_json::to_value(t).unwrap(),
                serde_json::json!(t.name())
            );
        }
    }

    #[test]
    fn urls_are_checked_and_split() {
        assert_eq!(
            check_url("https://hooks.example.com/chukei?x=1").unwrap(),
            Target {
                tls: true,
                host: "hooks.example.com".into(),
                port: 443,
                path: "/chukei?x=1".into()
            }
        );
        assert_eq!(
            check_url("http://[::1]:8080").unwrap(),
            Target {
                tls: false,
                host: "::1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        for bad in [
            "ftp://x",
            "https://user:pw@x.example/",
            "https:///path",
            "http://x:port/",
        ] {
            let error = check_url(bad).unwrap_err().to_string();
            assert!(error.starts_with("url: "), "{bad}: {error}");
        }
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1::1"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_schedule_grows_and_honours_retry_after() {
        let schedule: RetrySchedule = "5s,5m,24h".parse().unwrap();
        assert_eq!(schedule.after(1, None), Duration::from_secs(5));
        assert_eq!(schedule.after(2, None), Duration::from_secs(300));
        assert_eq!(schedule.after(9, None), Duration::from_secs(86_400));
        assert_eq!(
            schedule.after(1, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(RetrySchedule::default().0.len(), 7);
        assert!("5x".parse::<RetrySchedule>().is_err());
        assert!("0s".parse::<RetrySchedule>().is_err());
    }
}
