//! The rows a message is stored as: its own row with the plan, and the row
//! of the follow-up it carries.

use chukei_proto::window::Window;
use const_format::formatcp;

use super::audience::StoredTarget;
use super::planning::{MessagePlan, Sql};
use super::{Param, stored_list};
use crate::error::{Error, Result};
use crate::policy::{Policy, PolicyKind, Priority, SendTime, WindowMode};
use crate::targeting::{Channel, MessageState, NewMessage};

/// The `INSERT` of a new message row with its plan: state 1 (accepted),
/// recipients not yet matched, the winning bid it goes on (if any) and the
/// price table in force, which its charges use.
pub(super) fn insert_message(
    message_id: &str,
    fingerprint: &str,
    message: &NewMessage,
    plan: &MessagePlan,
    (description, bid_id): (&str, Option<&str>),
    service_id: Option<&str>,
    segment: Option<StoredTarget>,
) -> Sql {
    let mut columns = target_columns(message_id, fingerprint, message, plan, service_id, segment);
    columns.extend(content_columns(message));
    columns.extend(plan_columns(
        plan,
        description,
        (MessageState::Accepted, None),
    ));
    columns.push(("bid_id", Param::OptText(bid_id.map(str::to_owned))));
    Sql::insert_computed(
        "messages",
        columns,
        &[("price_table", formatcp!("({PRICE_TABLE_IN_FORCE})"))],
    )
}

/// The price table in force, which a new message keeps.
pub(super) const PRICE_TABLE_IN_FORCE: &str = "SELECT MAX(id) FROM price_tables";

/// The columns of a targeted message accepted already expanded: `matched`
/// people planned in the same transaction, no bid (`accept_batch.rs`).
pub(super) fn expanded_message_columns(
    message_id: &str,
    fingerprint: &str,
    message: &NewMessage,
    plan: &MessagePlan,
    description: &str,
    matched: u64,
) -> Vec<(&'static str, Param)> {
    let mut columns = target_columns(message_id, fingerprint, message, plan, None, None);
    columns.extend(content_columns(message));
    columns.extend(plan_columns(
        plan,
        description,
        (MessageState::Expanded, Some(matched)),
    ));
    columns.push(("bid_id", Param::OptText(None)));
    columns
}

/// Whose message it is and whom it is for.
fn target_columns(
    message_id: &str,
    fingerprint: &str,
    message: &NewMessage,
    plan: &MessagePlan,
    service_id: Option<&str>,
    segment: Option<StoredTarget>,
) -> Vec<(&'static str, Param)> {
    let segment = segment.unwrap_or_default();
    let text = |value: &str| Param::Text(value.to_owned());
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
    ]
}

/// What the message says.
fn content_columns(message: &NewMessage) -> Vec<(&'static str, Param)> {
    let text = |value: &str| Param::Text(value.to_owned());
    vec![
        ("trace_parent", text(&message.trace_parent)),
        ("content_text", text(&message.content.text)),
        ("media_url", text(&message.content.media_url)),
        ("subject", text(&message.content.subject)),
        (
            "suggested_replies",
            Param::Text(message.content.suggested_replies.join("\n")),
        ),
    ]
}

/// How, when and at what priority it goes, its state and the people it
/// matched (`None` until it is expanded).
fn plan_columns(
    plan: &MessagePlan,
    description: &str,
    (state, matched): (MessageState, Option<u64>),
) -> Vec<(&'static str, Param)> {
    let text = |value: &str| Param::Text(value.to_owned());
    vec![
        (
            "channel",
            Param::Int(Channel::number(plan.policy.channels.first().copied())),
        ),
        ("all_carriers", Param::Bool(plan.all_carriers)),
        ("state", Param::Int(state as i64)),
        ("matched", Param::OptInt(matched.map(|m| m as i64))),
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
    ]
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

/// A message's row as expansion and delivery control read it back.
#[derive(sqlx::FromRow)]
pub(super) struct PlanRow {
    enterprise_id: String,
    target_kind: String,
    target_service_id: Option<String>,
    seg_gender: Option<String>,
    seg_age_min: Option<i64>,
    seg_age_max: Option<i64>,
    seg_regions: Option<String>,
    seg_occupations: Option<String>,
    all_carriers: bool,
    state: i64,
    policy: String,
    channels: String,
    timeout_ms: i64,
    max_resends: i64,
    resend_until_delivered: bool,
    delivery_window: Option<String>,
    window_at_carrier: bool,
    priority: i64,
    accepted_at: i64,
    expires_at: i64,
    follow_up_id: Option<String>,
    follow_up_delay_ms: i64,
    send_time: Option<String>,
}

impl PlanRow {
    /// The plan, the target and the message's state.
    pub(super) fn into_plan(self) -> Result<(MessagePlan, StoredTarget, i64)> {
        let target = StoredTarget {
            is_segment: self.target_kind == "segment",
            service_id: self.target_service_id,
            gender: self.seg_gender,
            age: self.seg_age_min.zip(self.seg_age_max),
            regions: stored_list(self.seg_regions.as_deref()),
            occupations: stored_list(self.seg_occupations.as_deref()),
        };
        let plan = MessagePlan {
            enterprise_id: self.enterprise_id,
            target_kind: self.target_kind,
            policy: Policy {
                kind: PolicyKind::parse(&self.policy).unwrap_or(PolicyKind::Fixed),
                channels: self
                    .channels
                    .split(',')
                    .filter_map(|n| n.parse().ok())
                    .filter_map(Channel::from_number)
                    .collect(),
                timeout_ms: self.timeout_ms,
                max_resends: self.max_resends as u32,
                resend_until_delivered: self.resend_until_delivered,
            },
            all_carriers: self.all_carriers,
            window: self
                .delivery_window
                .map(|w| Window::decode(&w))
                .transpose()
                .map_err(|e| Error::Internal(anyhow::anyhow!(e)))?,
            window_mode: if self.window_at_carrier {
                WindowMode::AtCarrier
            } else {
                WindowMode::HeldAtRelay
            },
            priority: Priority::from_number(self.priority),
            accepted_at: self.accepted_at,
            expires_at: self.expires_at,
            follow_up_id: self.follow_up_id,
            follow_up_delay_ms: self.follow_up_delay_ms,
            send_time: self.send_time.and_then(|stored| SendTime::decode(&stored)),
        };
        Ok((plan, target, self.state))
    }
}
