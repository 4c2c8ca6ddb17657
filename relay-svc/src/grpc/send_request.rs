//! What an enterprise's send request means: `SendMessageRequest` (and
//! each request of a `SendMessages` stream, and a quote's) validated into a
//! [`NewMessage`] — target, content, policy, timing, follow-up — every error
//! naming its field.

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use chukei_proto::window::Window;

use super::{age_range, channel_from_wire, gender, occupation, optional, region, required};
use crate::error::{Error, Result};
use crate::policy::{
    FollowUp, MAX_RESENDS, MAX_SEND_TIME_HORIZON_MS, Policy, PolicyKind, Priority, SendTime,
    Timing, WindowMode,
};
use crate::targeting::{self, Channel, Content, NewMessage, Segment, Target};

impl TryFrom<pb::SendMessageRequest> for NewMessage {
    type Error = Error;

    fn try_from(request: pb::SendMessageRequest) -> Result<Self> {
        let idempotency_key =
            required("idempotency_key", &request.idempotency_key, 128)?.to_owned();
        let content = content_from_wire("content", request.content)?;
        let channel = channel_from_wire("channel", request.channel)?;
        let policy = match request.policy {
            None => Policy::fixed(channel),
            Some(_) if channel.is_some() => {
                return Err(Error::invalid(
                    "channel",
                    "give the channels in policy.channels when a policy is given",
                ));
            }
            Some(policy) => policy_from_wire(policy)?,
        };
        let target = target_from_wire(request.target.and_then(|t| t.kind))?;
        let mode = window_mode_from_wire(request.window_mode)?;
        let expires_at = request
            .expires_at
            .as_ref()
            .map(|at| chukei_proto::validate::instant("expires_at", at))
            .transpose()?;
        let timing = Timing {
            window: Window::from_wire("window", request.window.as_ref())?,
            mode,
            expires_at,
            send_time: request.send_time.map(send_time_from_wire).transpose()?,
        };
        if timing.window.is_some() && timing.send_time.is_some() {
            return Err(Error::invalid(
                "send_time",
                "cannot be combined with a window: each person's time is chosen for them",
            ));
        }
        let follow_up = request.follow_up.map(follow_up_from_wire).transpose()?;
        let bid_id = optional("bid_id", &request.bid_id, 64)?;
        let priority = priority_from_wire(request.priority)?;
        Ok(Self {
            idempotency_key,
            target,
            content,
            policy,
            all_carriers: request.all_carriers,
            timing,
            follow_up,
            priority,
            bid_id,
            trace_parent: String::new(),
        })
    }
}

/// Who a message is for: refs (deduplicated, each named by its index when
/// empty or too long), everyone registered, a service, or a segment.
fn target_from_wire(kind: Option<pb::target::Kind>) -> Result<Target> {
    Ok(match kind {
        None => return Err(Error::invalid("target", "is required")),
        Some(pb::target::Kind::Refs(list)) => {
            if list.refs.is_empty() {
                return Err(Error::invalid("target.refs", "must name at least one ref"));
            }
            if list.refs.len() > targeting::MAX_REFS {
                return Err(Error::invalid(
                    "target.refs",
                    format!("must name at most {} refs", targeting::MAX_REFS),
                ));
            }
            let mut seen = std::collections::HashSet::with_capacity(list.refs.len());
            let mut refs = Vec::with_capacity(list.refs.len());
            for (index, user_ref) in list.refs.iter().enumerate() {
                let user_ref = required(&format!("target.refs[{index}]"), user_ref, 64)?;
                if seen.insert(user_ref) {
                    refs.push(user_ref.to_owned());
                }
            }
            Target::Refs(refs)
        }
        Some(pb::target::Kind::AllRegistered(true)) => Target::AllRegistered,
        Some(pb::target::Kind::AllRegistered(false)) => {
            return Err(Error::invalid(
                "target.all_registered",
                "must be true when given",
            ));
        }
        Some(pb::target::Kind::ServiceId(service_id)) => {
            Target::Service(required("target.service_id", &service_id, 64)?.to_owned())
        }
        Some(pb::target::Kind::Segment(segment)) => Target::Segment(segment_from_wire(segment)?),
    })
}

fn window_mode_from_wire(window_mode: i32) -> Result<WindowMode> {
    match pb::WindowMode::try_from(window_mode) {
        Ok(pb::WindowMode::Unspecified | pb::WindowMode::HeldAtRelay) => {
            Ok(WindowMode::HeldAtRelay)
        }
        Ok(pb::WindowMode::AtCarrier) => Ok(WindowMode::AtCarrier),
        Err(_) => Err(Error::invalid(
            "window_mode",
            format!("unknown window mode {window_mode}"),
        )),
    }
}

fn priority_from_wire(priority: i32) -> Result<Priority> {
    match pb::Priority::try_from(priority) {
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Err(_) => Err(Error::invalid(
            "priority",
            format!("unknown priority {priority}"),
        )),
    }
}

/// A per-person send time; the horizon is required and at most 24 h.
fn send_time_from_wire(send_time: pb::SendTime) -> Result<SendTime> {
    let within = |field: &str, within: Option<prost_types::Duration>| -> Result<i64> {
        let within = within.ok_or_else(|| Error::invalid(field, "is required"))?;
        let ms = within.seconds.saturating_mul(1000) + i64::from(within.nanos) / 1_000_000;
        if ms <= 0 || ms > MAX_SEND_TIME_HORIZON_MS {
            return Err(Error::invalid(field, "must be more than 0 and at most 24h"));
        }
        Ok(ms)
    };
    match send_time.kind {
        Some(pb::send_time::Kind::BestHour(best)) => Ok(SendTime::BestHour {
            within_ms: within("send_time.best_hour.within", best.within)?,
        }),
        Some(pb::send_time::Kind::PlaceHour(place)) => {
            if !(place.min_open_rate > 0.0 && place.min_open_rate <= 1.0) {
                return Err(Error::invalid(
                    "send_time.place_hour.min_open_rate",
                    "must be more than 0 and at most 1",
                ));
            }
            Ok(SendTime::PlaceHour {
                min_rate_permille: (place.min_open_rate * 1000.0).round() as i64,
                within_ms: within("send_time.place_hour.within", place.within)?,
            })
        }
        None => Err(Error::invalid(
            "send_time",
            "best_hour or place_hour is required",
        )),
    }
}

/// Message content named `field`: text required and bounded, media an http(s)
/// URL, at most 11 suggested replies of 25 characters (RCS's limits).
fn content_from_wire(field: &str, content: Option<common::Content>) -> Result<Content> {
    let content = content.ok_or_else(|| Error::invalid(field, "is required"))?;
    if content.text.trim().is_empty() {
        return Err(Error::invalid(format!("{field}.text"), "must not be empty"));
    }
    if content.text.len() > targeting::MAX_TEXT_BYTES {
        return Err(Error::invalid(
            format!("{field}.text"),
            format!("must be at most {} bytes", targeting::MAX_TEXT_BYTES),
        ));
    }
    let media_url_ok = content.media_url.is_empty()
        || content.media_url.starts_with("https://")
        || content.media_url.starts_with("http://");
    if !media_url_ok {
        return Err(Error::invalid(
            format!("{field}.media_url"),
            "must be an http(s) URL",
        ));
    }
    if content.subject.chars().count() > 200 || content.subject.contains(['\r', '\n']) {
        return Err(Error::invalid(
            format!("{field}.subject"),
            "must be one line of at most 200 characters",
        ));
    }
    if content.suggested_replies.len() > 11 {
        return Err(Error::invalid(
            format!("{field}.suggested_replies"),
            "at most 11 suggested replies",
        ));
    }
    for (index, reply) in content.suggested_replies.iter().enumerate() {
        let count = reply.chars().count();
        if count == 0 || count > 25 || reply.contains('\n') {
            return Err(Error::invalid(
                format!("{field}.suggested_replies[{index}]"),
                "must be one line of 1 to 25 characters",
            ));
        }
    }
    Ok(Content {
        text: content.text,
        media_url: content.media_url,
        subject: content.subject,
        suggested_replies: content.suggested_replies,
    })
}

/// A channel field: unspecified is `None`, an unknown number is refused.
/// Milliseconds of a wire duration; negative or absurd ones are refused.
pub(super) fn duration_ms(field: &str, duration: Option<&prost_types::Duration>) -> Result<i64> {
    let Some(duration) = duration else {
        return Ok(0);
    };
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    if duration.seconds > MAX_DELAY_SECS {
        return Err(Error::invalid(field, "must be at most 30 days"));
    }
    Ok(duration.seconds * 1000 + i64::from(duration.nanos) / 1_000_000)
}

/// The longest timeout or delay a message may ask for.
const MAX_DELAY_SECS: i64 = 30 * 24 * 3600;

/// A policy's channels, in order: each named once, as many as `kind` needs.
fn policy_channels(kind: PolicyKind, numbers: &[i32]) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(numbers.len());
    for (index, number) in numbers.iter().enumerate() {
        let field = format!("policy.channels[{index}]");
        let channel = channel_from_wire(&field, *number)?
            .ok_or_else(|| Error::invalid(&field, "must name a channel"))?;
        if channels.contains(&channel) {
            return Err(Error::invalid(field, "names a channel twice"));
        }
        channels.push(channel);
    }
    let least = match kind {
        PolicyKind::Fixed | PolicyKind::Resend => 1,
        PolicyKind::Fallback | PolicyKind::Multi => 2,
        PolicyKind::MostUsed | PolicyKind::Best => 0,
    };
    if channels.len() < least {
        let reason = if least == 1 {
            "must name at least one channel".to_owned()
        } else {
            format!("must name at least {least} channels for {}", kind.as_str())
        };
        return Err(Error::invalid("policy.channels", reason));
    }
    if kind == PolicyKind::Resend && channels.len() > 1 {
        return Err(Error::invalid(
            "policy.channels",
            "resend sends on exactly one channel",
        ));
    }
    Ok(channels)
}

fn policy_from_wire(policy: pb::DeliveryPolicy) -> Result<Policy> {
    let kind = match pb::PolicyKind::try_from(policy.kind) {
        Ok(pb::PolicyKind::Unspecified) => {
            return Err(Error::invalid("policy.kind", "is required"));
        }
        Ok(pb::PolicyKind::Fixed) => PolicyKind::Fixed,
        Ok(pb::PolicyKind::MostUsed) => PolicyKind::MostUsed,
        Ok(pb::PolicyKind::Fallback) => PolicyKind::Fallback,
        Ok(pb::PolicyKind::Multi) => PolicyKind::Multi,
        Ok(pb::PolicyKind::Resend) => PolicyKind::Resend,
        Ok(pb::PolicyKind::Best) => PolicyKind::Best,
        Err(_) => {
            return Err(Error::invalid(
                "policy.kind",
                format!("unknown policy {}", policy.kind),
            ));
        }
    };
    let channels = policy_channels(kind, &policy.channels)?;
    let timeout_ms = duration_ms("policy.timeout", policy.timeout.as_ref())?;
    let timed = matches!(kind, PolicyKind::Fallback | PolicyKind::Resend);
    if timed && timeout_ms <= 0 {
        return Err(Error::invalid(
            "policy.timeout",
            format!("must be positive for {}", kind.as_str()),
        ));
    }
    if !timed && policy.timeout.is_some() {
        return Err(Error::invalid(
            "policy.timeout",
            "only fallback and resend use a timeout",
        ));
    }
    match kind {
        PolicyKind::Resend if !(1..=MAX_RESENDS).contains(&policy.max_resends) => {
            return Err(Error::invalid(
                "policy.max_resends",
                format!("must be between 1 and {MAX_RESENDS}"),
            ));
        }
        PolicyKind::Resend => {}
        _ if policy.max_resends != 0 => {
            return Err(Error::invalid(
                "policy.max_resends",
                "only resend sends again",
            ));
        }
        _ => {}
    }
    let resend_until_delivered = match pb::ResendUntil::try_from(policy.resend_until) {
        Ok(pb::ResendUntil::Unspecified | pb::ResendUntil::Opened) => false,
        Ok(pb::ResendUntil::Delivered) => true,
        Err(_) => {
            return Err(Error::invalid(
                "policy.resend_until",
                format!("unknown value {}", policy.resend_until),
            ));
        }
    };
    Ok(Policy {
        kind,
        channels,
        timeout_ms,
        max_resends: policy.max_resends,
        resend_until_delivered,
    })
}

fn follow_up_from_wire(follow_up: pb::FollowUp) -> Result<FollowUp> {
    Ok(FollowUp {
        content: content_from_wire("follow_up.content", follow_up.content)?,
        delay_ms: duration_ms("follow_up.delay", follow_up.delay.as_ref())?,
        channel: channel_from_wire("follow_up.channel", follow_up.channel)?,
    })
}

fn segment_from_wire(segment: pb::Segment) -> Result<Segment> {
    let parsed = Segment {
        gender: gender("target.segment.gender", segment.gender)?,
        age: age_range("target.segment.age", segment.age_min, segment.age_max)?,
        regions: segment
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| region(&format!("target.segment.regions[{i}]"), r))
            .collect::<Result<_>>()?,
        occupations: segment
            .occupations
            .iter()
            .enumerate()
            .map(|(i, o)| occupation(&format!("target.segment.occupations[{i}]"), o))
            .collect::<Result<_>>()?,
        service_id: optional("target.segment.service_id", &segment.service_id, 64)?,
    };
    if !parsed.has_criteria() {
        return Err(Error::invalid(
            "target.segment",
            "must give at least one of gender, age, regions, occupations",
        ));
    }
    if parsed.regions.len() > 64 || parsed.occupations.len() > 64 {
        return Err(Error::invalid(
            "target.segment",
            "at most 64 regions and 64 occupations",
        ));
    }
    Ok(parsed)
}
