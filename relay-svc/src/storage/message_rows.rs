//! The rows a message is stored as: its own row with the plan, and the row
//! of the follow-up it carries.

use chukei_proto::window::Window;

use super::Param;
use super::audience::StoredTarget;
use super::planning::{MessagePlan, Sql};
use crate::policy::{PolicyKind, SendTime, WindowMode};
use crate::targeting::{Channel, MessageState, NewMessage};

/// The `INSERT` of a new message row with its plan: state 1 (accepted),
/// recipients not yet matched.
pub(super) fn insert_message(
    message_id: &str,
    fingerprint: &str,
    message: &NewMessage,
    plan: &MessagePlan,
    description: &str,
    service_id: Option<&str>,
    segment: Option<StoredTarget>,
) -> Sql {
    let segment = segment.unwrap_or_default();
    let text = |value: &str| Param::Text(value.to_owned());
    Sql::insert(
        "messages",
        vec![
            ("id", text(message_id)),
            ("enterprise_id", text(&plan.enterprise_id)),
            ("idempotency_key", text(&message.idempotency_key)),
            ("fingerprint", text(fingerprint)),
            ("target_kind", text(&plan.target_kind)),
            ("by_attributes", Param::Bool(plan.target_kind == "segment")),
            (
                "target_service_id",
                Param::OptText(service_id.map(str::to_owned)),
            ),
            ("seg_gender", Param::OptText(segment.gender)),
            (
                "seg_age_min",
                Param::OptInt(segment.age.map(|(min, _)| min)),
            ),
            (
                "seg_age_max",
                Param::OptInt(segment.age.map(|(_, max)| max)),
            ),
            ("seg_regions", Param::Text(segment.regions.join("\n"))),
            (
                "seg_occupations",
                Param::Text(segment.occupations.join("\n")),
            ),
            ("trace_parent", text(&message.trace_parent)),
            ("content_text", text(&message.content.text)),
            ("media_url", text(&message.content.media_url)),
            ("subject", text(&message.content.subject)),
            (
                "suggested_replies",
                Param::Text(message.content.suggested_replies.join("\n")),
            ),
            (
                "channel",
                Param::Int(Channel::number(plan.policy.channels.first().copied())),
            ),
            ("all_carriers", Param::Bool(plan.all_carriers)),
            ("state", Param::Int(MessageState::Accepted as i64)),
            ("matched", Param::OptInt(None)),
            ("accepted_at", Param::Int(plan.accepted_at)),
            ("reconciled_at", Param::Int(plan.accepted_at)),
            ("not_before", Param::Int(plan.accepted_at)),
            ("expires_at", Param::Int(plan.expires_at)),
            ("policy", text(plan.policy.kind.as_str())),
            ("channels", Param::Text(channel_list(&plan.policy.channels))),
            ("timeout_ms", Param::Int(plan.policy.timeout_ms)),
            (
                "max_resends",
                Param::Int(i64::from(plan.policy.max_resends)),
            ),
            (
                "resend_until_delivered",
                Param::Bool(plan.policy.resend_until_delivered),
            ),
            (
                "delivery_window",
                Param::OptText(plan.window.as_ref().map(Window::encode)),
            ),
            (
                "window_at_carrier",
                Param::Bool(plan.window_mode == WindowMode::AtCarrier),
            ),
            ("priority", Param::Int(plan.priority.number())),
            ("plan", text(description)),
            ("follow_up_id", Param::OptText(plan.follow_up_id.clone())),
            ("follow_up_delay_ms", Param::Int(plan.follow_up_delay_ms)),
            (
                "send_time",
                Param::OptText(plan.send_time.map(SendTime::encode)),
            ),
            (
                "single_attempt",
                Param::Bool(plan.policy.at_most_one_attempt()),
            ),
        ],
    )
}

/// The `INSERT` of the message that carries a follow-up: same enterprise,
/// expanded with no recipients until people open the original.
pub(super) fn insert_follow_up(
    follow_up_id: &str,
    parent_id: &str,
    follow_up: &crate::policy::FollowUp,
    plan: &MessagePlan,
    now: i64,
) -> Sql {
    let channels: Vec<Channel> = follow_up.channel.into_iter().collect();
    let description = format!(
        "follow-up of {parent_id}: {} after each open, on {}",
        crate::policy::duration(follow_up.delay_ms),
        follow_up
            .channel
            .map_or("the channel opened", |c| crate::policy::channel_name(Some(
                c
            )))
    );
    let text = |value: &str| Param::Text(value.to_owned());
    Sql::insert(
        "messages",
        vec![
            ("id", text(follow_up_id)),
            ("enterprise_id", text(&plan.enterprise_id)),
            (
                "idempotency_key",
                Param::Text(format!("follow-up:{parent_id}")),
            ),
            ("fingerprint", text("")),
            ("target_kind", text("follow_up")),
            ("by_attributes", Param::Bool(plan.target_kind == "segment")),
            ("content_text", text(&follow_up.content.text)),
            ("media_url", text(&follow_up.content.media_url)),
            ("subject", text(&follow_up.content.subject)),
            (
                "suggested_replies",
                Param::Text(follow_up.content.suggested_replies.join("\n")),
            ),
            ("channel", Param::Int(Channel::number(follow_up.channel))),
            ("all_carriers", Param::Bool(plan.all_carriers)),
            ("state", Param::Int(MessageState::Expanded as i64)),
            ("matched", Param::Int(0)),
            ("accepted_at", Param::Int(now)),
            ("reconciled_at", Param::Int(now)),
            ("not_before", Param::Int(now)),
            (
                "expires_at",
                Param::Int(plan.expires_at.saturating_add(follow_up.delay_ms)),
            ),
            ("policy", text(PolicyKind::Fixed.as_str())),
            ("channels", Param::Text(channel_list(&channels))),
            ("priority", Param::Int(plan.priority.number())),
            ("plan", Param::Text(description)),
            ("single_attempt", Param::Bool(true)),
        ],
    )
}

fn channel_list(channels: &[Channel]) -> String {
    channels
        .iter()
        .map(|c| Channel::number(Some(*c)).to_string())
        .collect::<Vec<_>>()
        .join(",")
}
