//! The JSON a send (or a quote) takes, and its conversion into the proto
//! request the gRPC API takes, so `NewMessage::try_from` validates both.

use chukei_proto::relay::v1 as pb;
use serde::Deserialize;
use utoipa::ToSchema;

use super::Problem;
use super::wire::{self, Content};
use crate::content::Channel;

/// Who a message is for: exactly one of these.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Specific people, by the refs the enterprise knows them by.
    Refs(Vec<String>),
    /// Everyone registered with the enterprise (`true`).
    AllRegistered(bool),
    /// Everyone registered with one of the enterprise's services.
    ServiceId(String),
    /// People whose consented attributes match every criterion given.
    Segment(Segment),
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Gender {
    Female,
    Male,
    Other,
}

/// An attribute segment over consented profiles.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub gender: Option<Gender>,
    pub age_min: Option<u32>,
    pub age_max: Option<u32>,
    /// Region paths, e.g. `tokyo` (matching `tokyo/shibuya` too).
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub occupations: Vec<String>,
    /// Only people registered with this service.
    pub service_id: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Fixed,
    MostUsed,
    Fallback,
    Multi,
    Resend,
    Best,
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResendUntil {
    Opened,
    Delivered,
}

/// How channels are chosen and retried.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub kind: PolicyKind,
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// fallback / resend: how long an attempt waits for an open.
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub max_resends: u32,
    pub resend_until: Option<ResendUntil>,
}

/// When the message may reach people.
/// Exactly one of `daily` or `absolute`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub daily: Option<DailyWindow>,
    pub absolute: Option<AbsoluteWindow>,
}

/// Every day between two local times (`HH:MM`) of an IANA zone; an end
/// before the start crosses midnight.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DailyWindow {
    pub start: String,
    pub end: String,
    pub time_zone: String,
}

/// Once, between two RFC 3339 instants.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbsoluteWindow {
    pub start: String,
    pub end: String,
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowMode {
    HeldAtRelay,
    AtCarrier,
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    Normal,
    High,
}

/// Sent to each recipient who opens the message, and only to them.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowUp {
    pub content: Content,
    #[serde(default)]
    pub delay_seconds: u64,
    /// Absent: the channel opened.
    pub channel: Option<Channel>,
}

/// Each person's own send time, from what the hub has seen.
/// Exactly one of `best_hour` or `place_hour`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendTime {
    pub best_hour: Option<BestHour>,
    pub place_hour: Option<PlaceHour>,
}

/// At the hour of day the person opens most, within the horizon.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BestHour {
    pub within_seconds: u64,
}

/// Only people whose current place opens at least `min_open_rate` at some
/// hour within the horizon, each at the best such hour.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHour {
    pub min_open_rate: f64,
    pub within_seconds: u64,
}

/// A message to send (or to quote).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    pub target: Target,
    pub content: Content,
    /// Absent: the carrier's default channel (or the policy's channels).
    pub channel: Option<Channel>,
    pub policy: Option<Policy>,
    /// Deliver over every carrier the person is contracted with.
    #[serde(default)]
    pub all_carriers: bool,
    pub window: Option<Window>,
    pub window_mode: Option<WindowMode>,
    /// RFC 3339; not delivered by then, never later. Absent: the relay's default.
    pub expires_at: Option<String>,
    pub priority: Option<Priority>,
    pub follow_up: Option<FollowUp>,
    pub send_time: Option<SendTime>,
    /// A winning bid the message draws on.
    pub bid_id: Option<String>,
}

/// "HH:MM" as minutes after midnight.
fn minute_of_day(field: &str, text: &str) -> Result<u32, Problem> {
    let parsed = text
        .split_once(':')
        .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
        .filter(|(h, m)| *h < 24 && *m < 60 && text.len() == 5);
    parsed
        .map(|(h, m)| h * 60 + m)
        .ok_or_else(|| Problem::invalid(field, "must be a local time HH:MM, e.g. 18:00"))
}

impl Target {
    fn into_wire(self) -> pb::target::Kind {
        use chukei_proto::common::v1 as common;
        match self {
            Target::Refs(refs) => pb::target::Kind::Refs(pb::RefList { refs }),
            Target::AllRegistered(all) => pb::target::Kind::AllRegistered(all),
            Target::ServiceId(id) => pb::target::Kind::ServiceId(id),
            Target::Segment(s) => pb::target::Kind::Segment(pb::Segment {
                gender: s.gender.map_or(0, |g| match g {
                    Gender::Female => common::Gender::Female as i32,
                    Gender::Male => common::Gender::Male as i32,
                    Gender::Other => common::Gender::Other as i32,
                }),
                age_min: s.age_min,
                age_max: s.age_max,
                regions: s.regions,
                occupations: s.occupations,
                service_id: s.service_id.unwrap_or_default(),
            }),
        }
    }
}

impl Policy {
    fn into_wire(self) -> pb::DeliveryPolicy {
        pb::DeliveryPolicy {
            kind: match self.kind {
                PolicyKind::Fixed => pb::PolicyKind::Fixed,
                PolicyKind::MostUsed => pb::PolicyKind::MostUsed,
                PolicyKind::Fallback => pb::PolicyKind::Fallback,
                PolicyKind::Multi => pb::PolicyKind::Multi,
                PolicyKind::Resend => pb::PolicyKind::Resend,
                PolicyKind::Best => pb::PolicyKind::Best,
            } as i32,
            channels: self
                .channels
                .into_iter()
                .map(wire::channel_number)
                .collect(),
            timeout: self.timeout_seconds.map(wire::seconds),
            max_resends: self.max_resends,
            resend_until: match self.resend_until {
                None => pb::ResendUntil::Unspecified,
                Some(ResendUntil::Opened) => pb::ResendUntil::Opened,
                Some(ResendUntil::Delivered) => pb::ResendUntil::Delivered,
            } as i32,
        }
    }
}

impl Window {
    fn into_wire(self) -> Result<chukei_proto::common::v1::DeliveryWindow, Problem> {
        use chukei_proto::common::v1 as common;
        let kind = match (self.daily, self.absolute) {
            (Some(daily), None) => common::delivery_window::Kind::Daily(common::DailyWindow {
                start_minute: minute_of_day("window.daily.start", &daily.start)?,
                end_minute: minute_of_day("window.daily.end", &daily.end)?,
                time_zone: daily.time_zone,
            }),
            (None, Some(once)) => common::delivery_window::Kind::Absolute(common::AbsoluteWindow {
                start: Some(wire::parse_instant("window.absolute.start", &once.start)?),
                end: Some(wire::parse_instant("window.absolute.end", &once.end)?),
            }),
            _ => {
                return Err(Problem::invalid(
                    "window",
                    "give exactly one of daily or absolute",
                ));
            }
        };
        Ok(common::DeliveryWindow { kind: Some(kind) })
    }
}

impl SendTime {
    fn into_wire(self) -> Result<pb::SendTime, Problem> {
        let kind = match (self.best_hour, self.place_hour) {
            (Some(best), None) => pb::send_time::Kind::BestHour(pb::BestHour {
                within: Some(wire::seconds(best.within_seconds)),
            }),
            (None, Some(place)) => pb::send_time::Kind::PlaceHour(pb::PlaceHour {
                min_open_rate: place.min_open_rate,
                within: Some(wire::seconds(place.within_seconds)),
            }),
            _ => {
                let reason = "give exactly one of best_hour or place_hour";
                return Err(Problem::invalid("send_time", reason));
            }
        };
        Ok(pb::SendTime { kind: Some(kind) })
    }
}

impl SendBody {
    /// The proto request the gRPC API takes, so both are validated by one
    /// `NewMessage::try_from`.
    pub(super) fn into_request(
        self,
        idempotency_key: String,
    ) -> Result<pb::SendMessageRequest, Problem> {
        let target = self.target.into_wire();
        let policy = self.policy.map(Policy::into_wire);
        let window = self.window.map(Window::into_wire).transpose()?;
        let send_time = self.send_time.map(SendTime::into_wire).transpose()?;
        Ok(pb::SendMessageRequest {
            idempotency_key,
            target: Some(pb::Target { kind: Some(target) }),
            content: Some(self.content.into()),
            channel: self.channel.map_or(0, wire::channel_number),
            all_carriers: self.all_carriers,
            policy,
            window,
            window_mode: match self.window_mode {
                None => pb::WindowMode::Unspecified,
                Some(WindowMode::HeldAtRelay) => pb::WindowMode::HeldAtRelay,
                Some(WindowMode::AtCarrier) => pb::WindowMode::AtCarrier,
            } as i32,
            expires_at: self
                .expires_at
                .map(|at| wire::parse_instant("expires_at", &at))
                .transpose()?,
            follow_up: self.follow_up.map(|f| pb::FollowUp {
                content: Some(f.content.into()),
                delay: Some(wire::seconds(f.delay_seconds)),
                channel: f.channel.map_or(0, wire::channel_number),
            }),
            priority: match self.priority {
                None => pb::Priority::Unspecified,
                Some(Priority::Low) => pb::Priority::Low,
                Some(Priority::Normal) => pb::Priority::Normal,
                Some(Priority::High) => pb::Priority::High,
            } as i32,
            send_time,
            bid_id: self.bid_id.unwrap_or_default(),
        })
    }
}
