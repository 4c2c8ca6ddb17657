//! The command line's flags as relay requests: segment, channel, duration,
//! instant, window and policy syntax, and the `send` and `stats` requests
//! built from them; every error names its flag.

use crate::SendArgs;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;

/// Parses `key=value,…` into a segment; the error names the key.
pub fn parse_segment(text: &str) -> Result<pb::Segment, String> {
    let mut segment = pb::Segment::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("segment: {part:?} is not key=value"))?;
        let value = value.trim();
        match key.trim() {
            "gender" => {
                segment.gender = match value {
                    "f" | "female" => common::Gender::Female,
                    "m" | "male" => common::Gender::Male,
                    "x" | "other" => common::Gender::Other,
                    _ => return Err(format!("segment gender: {value:?} is not f, m or x")),
                } as i32;
            }
            "age" => {
                let bad = || format!("segment age: {value:?} is not N, N-M or Ns (e.g. 30s)");
                let (min, max) = if let Some(decade) = value.strip_suffix('s') {
                    let d: u32 = decade.parse().map_err(|_| bad())?;
                    (d, d.checked_add(9).ok_or_else(bad)?)
                } else if let Some((a, b)) = value.split_once('-') {
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
                } else {
                    let n: u32 = value.parse().map_err(|_| bad())?;
                    (n, n)
                };
                if min > max {
                    return Err(format!("segment age: {min} is above {max}"));
                }
                segment.age_min = Some(min);
                segment.age_max = Some(max);
            }
            "region" => segment.regions.extend(value.split('|').map(str::to_owned)),
            "occupation" => segment
                .occupations
                .extend(value.split('|').map(str::to_owned)),
            "service" => segment.service_id = value.to_owned(),
            other => {
                return Err(format!(
                    "segment: unknown key {other:?} (gender, age, region, occupation, service)"
                ));
            }
        }
    }
    Ok(segment)
}

pub(crate) fn parse_channel(flag: &str, text: &str) -> anyhow::Result<common::Channel> {
    common::Channel::from_short_name(text.trim())
        .ok_or_else(|| anyhow::anyhow!("{flag}: {text:?} is not rcs, sms, sns or email"))
}

/// "90s", "15m", "2h", "3d" as a protobuf duration; the error names `flag`.
pub fn parse_duration(flag: &str, text: &str) -> anyhow::Result<prost_types::Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| {
        anyhow::anyhow!("{flag}: {text:?} is not a duration like 90s, 15m, 2h or 3d")
    })?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => anyhow::bail!("{flag}: {text:?} needs a unit: s, m, h or d"),
    };
    Ok(prost_types::Duration {
        seconds: number.saturating_mul(unit),
        nanos: 0,
    })
}

pub(crate) fn parse_instant(flag: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let at: jiff::Timestamp = text
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag}: {text:?} is not an RFC 3339 instant"))?;
    Ok(prost_types::Timestamp {
        seconds: at.as_second(),
        nanos: at.subsec_nanosecond(),
    })
}

/// `--window`: "HH:MM-HH:MM" daily in `zone`, or "start/end" instants.
pub fn parse_window(text: &str, zone: &str) -> anyhow::Result<common::DeliveryWindow> {
    let kind = if let Some((start, end)) = text.split_once('/') {
        common::delivery_window::Kind::Absolute(common::AbsoluteWindow {
            start: Some(parse_instant("--window", start)?),
            end: Some(parse_instant("--window", end)?),
        })
    } else {
        let minute = |part: &str| -> anyhow::Result<u32> {
            let bad = || anyhow::anyhow!("--window: {part:?} is not HH:MM");
            let (h, m) = part.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| anyhow::anyhow!("--window: {text:?} is not HH:MM-HH:MM or start/end"))?;
        common::delivery_window::Kind::Daily(common::DailyWindow {
            start_minute: minute(start)?,
            end_minute: minute(end)?,
            time_zone: zone.to_owned(),
        })
    };
    Ok(common::DeliveryWindow { kind: Some(kind) })
}

pub(crate) fn parse_policy(args: &SendArgs) -> anyhow::Result<Option<pb::DeliveryPolicy>> {
    let channels = args
        .channels
        .iter()
        .map(|c| parse_channel("--channels", c).map(|c| c as i32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kind = match args.policy.as_deref() {
        None if channels.is_empty() => return Ok(None),
        None | Some("fixed") => pb::PolicyKind::Fixed,
        Some("most-used") => pb::PolicyKind::MostUsed,
        Some("fallback") => pb::PolicyKind::Fallback,
        Some("multi") => pb::PolicyKind::Multi,
        Some("resend") => pb::PolicyKind::Resend,
        Some("best") => pb::PolicyKind::Best,
        Some(other) => anyhow::bail!(
            "--policy: {other:?} is not fixed, most-used, fallback, multi, resend or best"
        ),
    };
    let channels = match &args.channel {
        Some(channel) if channels.is_empty() => vec![parse_channel("--channel", channel)? as i32],
        _ => channels,
    };
    let resend_until = match args.resend_until.as_deref() {
        None => pb::ResendUntil::Unspecified,
        Some("opened") => pb::ResendUntil::Opened,
        Some("delivered") => pb::ResendUntil::Delivered,
        Some(other) => anyhow::bail!("--resend-until: {other:?} is not opened or delivered"),
    };
    Ok(Some(pb::DeliveryPolicy {
        kind: kind as i32,
        channels,
        timeout: args
            .timeout
            .as_deref()
            .map(|t| parse_duration("--timeout", t))
            .transpose()?,
        max_resends: args.max_resends.unwrap_or(0),
        resend_until: resend_until as i32,
    }))
}

/// Builds the `SendMessage` request from the command line.
pub fn send_request(args: &SendArgs) -> anyhow::Result<pb::SendMessageRequest> {
    let kind = if args.all {
        pb::target::Kind::AllRegistered(true)
    } else if let Some(service) = &args.service {
        pb::target::Kind::ServiceId(service.clone())
    } else if let Some(segment) = &args.segment {
        pb::target::Kind::Segment(parse_segment(segment).map_err(anyhow::Error::msg)?)
    } else if !args.refs.is_empty() {
        pb::target::Kind::Refs(pb::RefList {
            refs: args.refs.clone(),
        })
    } else {
        anyhow::bail!("send: give refs, --all, --service or --segment");
    };
    let policy = parse_policy(args)?;
    let channel = match (&args.channel, &policy) {
        (Some(channel), None) => parse_channel("--channel", channel)? as i32,
        _ => 0,
    };
    let window_mode = match args.window_at.as_str() {
        "relay" => pb::WindowMode::HeldAtRelay,
        "carrier" => pb::WindowMode::AtCarrier,
        other => anyhow::bail!("--window-at: {other:?} is not relay or carrier"),
    };
    let expires_at = match (&args.expires_in, &args.expires_at) {
        (Some(within), _) => {
            let within = parse_duration("--expires-in", within)?;
            let now = jiff::Timestamp::now().as_second();
            Some(prost_types::Timestamp {
                seconds: now + within.seconds,
                nanos: 0,
            })
        }
        (None, Some(at)) => Some(parse_instant("--expires-at", at)?),
        (None, None) => None,
    };
    let follow_up = match &args.follow_up {
        None => None,
        Some(text) => Some(pb::FollowUp {
            content: Some(common::Content {
                text: text.clone(),
                ..Default::default()
            }),
            delay: Some(parse_duration("--follow-up-delay", &args.follow_up_delay)?),
            channel: args
                .follow_up_channel
                .as_deref()
                .map(|c| parse_channel("--follow-up-channel", c))
                .transpose()?
                .map_or(0, |c| c as i32),
        }),
    };
    let priority = match args.priority.as_deref() {
        None => pb::Priority::Unspecified,
        Some("low") => pb::Priority::Low,
        Some("normal") => pb::Priority::Normal,
        Some("high") => pb::Priority::High,
        Some(other) => anyhow::bail!("--priority: {other:?} is not low, normal or high"),
    };
    let send_time = match (&args.best_hour_within, args.place_hour_min_rate) {
        (Some(within), _) => Some(pb::send_time::Kind::BestHour(pb::BestHour {
            within: Some(parse_duration("--best-hour-within", within)?),
        })),
        (None, Some(rate)) => Some(pb::send_time::Kind::PlaceHour(pb::PlaceHour {
            min_open_rate: rate,
            within: Some(parse_duration(
                "--place-hour-within",
                &args.place_hour_within,
            )?),
        })),
        (None, None) => None,
    };
    Ok(pb::SendMessageRequest {
        idempotency_key: args
            .idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        target: Some(pb::Target { kind: Some(kind) }),
        content: Some(common::Content {
            text: args.text.clone().unwrap_or_default(),
            media_url: args.media_url.clone().unwrap_or_default(),
            subject: args.subject.clone().unwrap_or_default(),
            suggested_replies: args.replies.clone(),
        }),
        channel,
        all_carriers: args.all_carriers,
        policy,
        window: args
            .window
            .as_deref()
            .map(|w| parse_window(w, &args.zone))
            .transpose()?,
        window_mode: if args.window.is_some() {
            window_mode as i32
        } else {
            0
        },
        expires_at,
        follow_up,
        priority: priority as i32,
        send_time: send_time.map(|kind| pb::SendTime { kind: Some(kind) }),
        bid_id: args.bid.clone().unwrap_or_default(),
    })
}

/// The `stats` flags as a request; errors name the flag.
pub fn stats_request(
    by: &[String],
    since: &str,
    until: Option<&str>,
    zone: &str,
) -> anyhow::Result<pb::GetStatsRequest> {
    let by = by
        .iter()
        .map(|name| {
            let name = name.trim();
            chukei_proto::stats::dimension(name)
                .map(|d| d as i32)
                .ok_or_else(|| {
                    let known = chukei_proto::stats::dimension_names();
                    anyhow::anyhow!("--by: {name:?} is not one of {known}")
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (since, lookback) = if since.contains('T') {
        (Some(parse_instant("--since", since)?), None)
    } else {
        (None, Some(parse_duration("--since", since)?))
    };
    Ok(pb::GetStatsRequest {
        by,
        since,
        until: until.map(|u| parse_instant("--until", u)).transpose()?,
        zone: zone.to_owned(),
        lookback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    #[test]
    fn segments_parse_every_key() {
        let segment = parse_segment(
            "gender=f, age=30s, region=tokyo|osaka, occupation=engineer, service=svc_1",
        )
        .unwrap();
        assert_eq!(segment.gender, common::Gender::Female as i32);
        assert_eq!((segment.age_min, segment.age_max), (Some(30), Some(39)));
        assert_eq!(segment.regions, ["tokyo", "osaka"]);
        assert_eq!(segment.occupations, ["engineer"]);
        assert_eq!(segment.service_id, "svc_1");
        assert_eq!(parse_segment("age=30-34").unwrap().age_max, Some(34));
    }

    #[test]
    fn windows_durations_and_policies_parse() {
        let daily = parse_window("18:00-21:30", "Asia/Tokyo").unwrap();
        let Some(common::delivery_window::Kind::Daily(daily)) = daily.kind else {
            panic!("not daily")
        };
        assert_eq!((daily.start_minute, daily.end_minute), (1080, 1290));
        assert_eq!(daily.time_zone, "Asia/Tokyo");
        assert!(parse_window("2026-11-27T09:00:00Z/2026-11-27T12:00:00Z", "UTC").is_ok());
        assert!(
            parse_window("25:00-26:00", "UTC")
                .unwrap_err()
                .to_string()
                .contains("--window")
        );
        assert_eq!(parse_duration("--timeout", "2h").unwrap().seconds, 7200);
        assert!(
            parse_duration("--timeout", "2")
                .unwrap_err()
                .to_string()
                .contains("unit")
        );
        let args = Cli::parse_from([
            "enterprise-cli",
            "send",
            "--text",
            "t",
            "--all",
            "--policy",
            "fallback",
            "--channels",
            "rcs,sms",
            "--timeout",
            "30m",
        ]);
        let Command::Send(args) = args.command else {
            panic!()
        };
        let request = send_request(&args).unwrap();
        let policy = request.policy.unwrap();
        assert_eq!(policy.kind, pb::PolicyKind::Fallback as i32);
        assert_eq!(
            policy.channels,
            [common::Channel::Rcs as i32, common::Channel::Sms as i32]
        );
        assert_eq!(policy.timeout.unwrap().seconds, 1800);
        assert_eq!(request.channel, 0);
    }

    #[test]
    fn segment_errors_name_the_key() {
        assert!(parse_segment("gender=q").unwrap_err().contains("gender"));
        assert!(parse_segment("age=old").unwrap_err().contains("age"));
        assert!(parse_segment("age=40-30").unwrap_err().contains("age"));
        assert!(parse_segment("height=180").unwrap_err().contains("height"));
        assert!(parse_segment("tokyo").unwrap_err().contains("key=value"));
    }

    proptest::proptest! {
        /// Any text: a segment or an error naming the segment, never a panic;
        /// a parsed age range is never upside down.
        #[test]
        fn any_segment_text_parses_or_is_refused(
            text in "((gender|age|region|occupation|service|x)=(\\PC|[0-9]{1,12}s?|-|\\|){0,12},?){0,6}",
        ) {
            match parse_segment(&text) {
                Ok(segment) => {
                    if let (Some(min), Some(max)) = (segment.age_min, segment.age_max) {
                        proptest::prop_assert!(min <= max);
                    }
                }
                Err(error) => proptest::prop_assert!(error.starts_with("segment"), "{error}"),
            }
        }
    }
}
