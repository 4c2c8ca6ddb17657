//! The console's send form and what it becomes: a `SendMessageRequest`,
//! validated by the relay exactly as the gRPC and REST edges validate it
//! (its errors name the request's fields; the form's labels say which
//! field each input fills).

use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use serde::{Deserialize, Serialize};

/// Every input of the send form, as posted (and echoed in the quote page's
/// hidden inputs, so the message sent is the one quoted).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub(super) struct SendForm {
    /// refs, all, service or segment.
    pub(super) target: String,
    /// One ref per line (or separated by commas).
    pub(super) refs: String,
    pub(super) service_id: String,
    /// female, male, other or empty.
    pub(super) gender: String,
    pub(super) age_min: String,
    pub(super) age_max: String,
    /// Comma-separated.
    pub(super) regions: String,
    pub(super) occupations: String,
    pub(super) text: String,
    pub(super) subject: String,
    /// default, fixed, most_used, fallback, multi, resend or best.
    pub(super) policy: String,
    /// Comma-separated, in order: rcs, sms, sns, email.
    pub(super) channels: String,
    pub(super) timeout_minutes: String,
    /// none or daily.
    pub(super) window: String,
    /// HH:MM.
    pub(super) window_start: String,
    pub(super) window_end: String,
    pub(super) window_zone: String,
    pub(super) expires_hours: String,
    /// Fixed when the quote is shown: sending twice sends once.
    pub(super) idempotency_key: String,
    pub(super) csrf: String,
}

/// A form input that could not be read, named by its label.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct FormError(pub(super) String);

fn number<T: std::str::FromStr>(label: &str, value: &str) -> Result<Option<T>, FormError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| FormError(format!("{label}: must be a whole number")))
}

fn list(value: &str) -> Vec<String> {
    value
        .split([',', '\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn minute_of_day(label: &str, value: &str) -> Result<u32, FormError> {
    let bad = || FormError(format!("{label}: must be a time HH:MM"));
    let (h, m) = value.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl SendForm {
    /// The request this form asks for, accepted at `now_ms`.
    pub(super) fn request(&self, now_ms: i64) -> Result<pb::SendMessageRequest, FormError> {
        let kind = self.recipients()?;
        let channels = self.channel_list()?;
        let policy = self.delivery_policy(&channels)?;
        let window = self.delivery_window()?;
        let expires_at = number::<i64>("Expires after (hours)", &self.expires_hours)?
            .map(|hours| chukei_proto::clock::to_timestamp(now_ms + hours * 3_600_000));
        Ok(pb::SendMessageRequest {
            idempotency_key: self.idempotency_key.clone(),
            target: Some(pb::Target { kind: Some(kind) }),
            content: Some(common::Content {
                text: self.text.clone(),
                subject: self.subject.clone(),
                ..Default::default()
            }),
            // Without a policy, the first channel named (if any) is the channel.
            channel: if policy.is_none() {
                channels.first().copied().unwrap_or(0)
            } else {
                0
            },
            policy,
            window,
            expires_at,
            ..Default::default()
        })
    }

    /// Who the message is for.
    fn recipients(&self) -> Result<pb::target::Kind, FormError> {
        Ok(match self.target.as_str() {
            "refs" => pb::target::Kind::Refs(pb::RefList {
                refs: list(&self.refs),
            }),
            "all" => pb::target::Kind::AllRegistered(true),
            "service" => pb::target::Kind::ServiceId(self.service_id.trim().to_owned()),
            "segment" => pb::target::Kind::Segment(pb::Segment {
                gender: match self.gender.as_str() {
                    "female" => common::Gender::Female,
                    "male" => common::Gender::Male,
                    "other" => common::Gender::Other,
                    _ => common::Gender::Unspecified,
                } as i32,
                age_min: number("Age from", &self.age_min)?,
                age_max: number("Age to", &self.age_max)?,
                regions: list(&self.regions),
                occupations: list(&self.occupations),
                service_id: self.service_id.trim().to_owned(),
            }),
            _ => {
                return Err(FormError(
                    "Recipients: choose who the message is for".into(),
                ));
            }
        })
    }

    /// The channels named, in order.
    fn channel_list(&self) -> Result<Vec<i32>, FormError> {
        list(&self.channels)
            .into_iter()
            .map(|name| {
                common::Channel::from_short_name(&name.to_lowercase())
                    .map(|channel| channel as i32)
                    .ok_or_else(|| {
                        FormError(format!(
                            "Channels: {name:?} is not one of rcs, sms, sns, email"
                        ))
                    })
            })
            .collect()
    }

    /// The channel policy chosen over `channels`, if any.
    fn delivery_policy(&self, channels: &[i32]) -> Result<Option<pb::DeliveryPolicy>, FormError> {
        let kind = match self.policy.as_str() {
            "" | "default" => return Ok(None),
            "fixed" => pb::PolicyKind::Fixed,
            "most_used" => pb::PolicyKind::MostUsed,
            "fallback" => pb::PolicyKind::Fallback,
            "multi" => pb::PolicyKind::Multi,
            "resend" => pb::PolicyKind::Resend,
            "best" => pb::PolicyKind::Best,
            other => {
                return Err(FormError(format!(
                    "Channel policy: {other:?} is not a policy"
                )));
            }
        };
        let timeout =
            number::<i64>("Wait before the next attempt", &self.timeout_minutes)?.map(|minutes| {
                prost_types::Duration {
                    seconds: minutes * 60,
                    nanos: 0,
                }
            });
        Ok(Some(pb::DeliveryPolicy {
            kind: kind as i32,
            channels: channels.to_vec(),
            timeout,
            max_resends: if kind == pb::PolicyKind::Resend { 1 } else { 0 },
            resend_until: 0,
        }))
    }

    /// The delivery window chosen, if any.
    fn delivery_window(&self) -> Result<Option<common::DeliveryWindow>, FormError> {
        match self.window.as_str() {
            "" | "none" => Ok(None),
            "daily" => Ok(Some(common::DeliveryWindow {
                kind: Some(common::delivery_window::Kind::Daily(common::DailyWindow {
                    start_minute: minute_of_day("Window from", &self.window_start)?,
                    end_minute: minute_of_day("Window to", &self.window_end)?,
                    time_zone: self.window_zone.trim().to_owned(),
                })),
            })),
            other => Err(FormError(format!("Window: {other:?} is not a window"))),
        }
    }

    /// The inputs as hidden fields of the quote page's send form.
    pub(super) fn hidden(&self) -> Vec<(&'static str, String)> {
        vec![
            ("target", self.target.clone()),
            ("refs", self.refs.clone()),
            ("service_id", self.service_id.clone()),
            ("gender", self.gender.clone()),
            ("age_min", self.age_min.clone()),
            ("age_max", self.age_max.clone()),
            ("regions", self.regions.clone()),
            ("occupations", self.occupations.clone()),
            ("text", self.text.clone()),
            ("subject", self.subject.clone()),
            ("policy", self.policy.clone()),
            ("channels", self.channels.clone()),
            ("timeout_minutes", self.timeout_minutes.clone()),
            ("window", self.window.clone()),
            ("window_start", self.window_start.clone()),
            ("window_end", self.window_end.clone()),
            ("window_zone", self.window_zone.clone()),
            ("expires_hours", self.expires_hours.clone()),
            ("idempotency_key", self.idempotency_key.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_form_becomes_the_request_the_api_takes() {
        let form = SendForm {
            target: "segment".into(),
            gender: "female".into(),
            age_min: "30".into(),
            age_max: "39".into(),
            regions: "tokyo, osaka".into(),
            text: "Sale".into(),
            policy: "fallback".into(),
            channels: "rcs,sms".into(),
            timeout_minutes: "30".into(),
            window: "daily".into(),
            window_start: "18:00".into(),
            window_end: "21:30".into(),
            window_zone: "Asia/Tokyo".into(),
            ..SendForm::default()
        };
        let request = form.request(0).unwrap();
        let Some(pb::target::Kind::Segment(segment)) = request.target.unwrap().kind else {
            panic!("a segment")
        };
        assert_eq!(segment.age_min, Some(30));
        assert_eq!(segment.regions, ["tokyo", "osaka"]);
        let policy = request.policy.unwrap();
        assert_eq!(policy.kind, pb::PolicyKind::Fallback as i32);
        assert_eq!(policy.channels.len(), 2);
        assert_eq!(policy.timeout.unwrap().seconds, 1_800);
        let Some(common::delivery_window::Kind::Daily(daily)) = request.window.unwrap().kind else {
            panic!("a daily window")
        };
        assert_eq!((daily.start_minute, daily.end_minute), (1_080, 1_290));
    }

    #[test]
    fn unreadable_inputs_are_named_by_their_label() {
        let form = SendForm {
            target: "segment".into(),
            age_min: "thirty".into(),
            ..SendForm::default()
        };
        assert_eq!(
            form.request(0).unwrap_err(),
            FormError("Age from: must be a whole number".into())
        );
        let form = SendForm {
            target: "all".into(),
            channels: "fax".into(),
            ..SendForm::default()
        };
        assert!(form.request(0).unwrap_err().0.starts_with("Channels:"));
        let form = SendForm {
            target: "all".into(),
            window: "daily".into(),
            window_start: "25:00".into(),
            ..SendForm::default()
        };
        assert!(form.request(0).unwrap_err().0.starts_with("Window from:"));
    }
}
