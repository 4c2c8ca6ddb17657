//! Delivery windows: when a delivery may reach a terminal. The relay (window
//! held at the relay) and carriers (window passed to the carrier) apply the
//! same arithmetic, so it lives here beside the wire type it reads.
//!
//! A window is either absolute — once, `[start, end)` — or daily between two
//! local times of an IANA zone; a daily window whose end is before its start
//! crosses midnight (22:00–02:00). Local times that do not exist (a DST gap)
//! resolve forwards, as `jiff`'s "compatible" disambiguation does.

use std::fmt;

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

use crate::clock::{rfc3339, to_timestamp};
use crate::common::v1 as common;
use crate::validate::FieldError;

const MINUTES_PER_DAY: u32 = 24 * 60;

/// A validated delivery window.
#[derive(Clone, Debug)]
pub enum Window {
    Absolute {
        start_ms: i64,
        end_ms: i64,
    },
    Daily {
        start_minute: u32,
        end_minute: u32,
        zone_name: String,
        zone: TimeZone,
    },
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl Eq for Window {}

impl Window {
    /// `[start_ms, end_ms)`; the end must be after the start.
    pub fn absolute(start_ms: i64, end_ms: i64) -> Result<Self, String> {
        if start_ms < 0 {
            return Err("start must not be before 1970".into());
        }
        if end_ms <= start_ms {
            return Err("end must be after start".into());
        }
        Ok(Self::Absolute { start_ms, end_ms })
    }

    /// Every day from `start_minute` to `end_minute` (minutes after local
    /// midnight) in the IANA zone `zone_name`.
    pub fn daily(start_minute: u32, end_minute: u32, zone_name: &str) -> Result<Self, String> {
        if start_minute >= MINUTES_PER_DAY || end_minute >= MINUTES_PER_DAY {
            return Err("minutes must be in 0..1439".into());
        }
        if start_minute == end_minute {
            return Err("start and end must differ".into());
        }
        let zone = TimeZone::get(zone_name)
            .map_err(|_| format!("unknown time zone {zone_name:?} (want an IANA name)"))?;
        Ok(Self::Daily {
            start_minute,
            end_minute,
            zone_name: zone_name.to_owned(),
            zone,
        })
    }

    /// The window's opening that contains `at`, or else the next one:
    /// `(open, close)` with `close > at`. `None` when the window will not open
    /// again (an absolute window already past).
    pub fn opening(&self, at: i64) -> Option<(i64, i64)> {
        match self {
            Self::Absolute { start_ms, end_ms } => (*end_ms > at).then_some((*start_ms, *end_ms)),
            Self::Daily {
                start_minute,
                end_minute,
                zone,
                ..
            } => {
                let today = Timestamp::from_millisecond(at)
                    .ok()?
                    .to_zoned(zone.clone())
                    .date();
                // Yesterday's opening may still be open when the window crosses midnight;
                // a DST gap can only shift an opening by hours, so three days suffice.
                (-1..=2).find_map(|offset| {
                    let day = today.checked_add(Span::new().days(offset)).ok()?;
                    let local = |date: jiff::civil::Date, minute: u32| {
                        date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0)
                            .to_zoned(zone.clone())
                            .ok()
                            .map(|z| z.timestamp().as_millisecond())
                    };
                    let open = local(day, *start_minute)?;
                    let close_day = if end_minute > start_minute {
                        day
                    } else {
                        day.tomorrow().ok()?
                    };
                    let close = local(close_day, *end_minute)?;
                    (close > at).then_some((open, close))
                })
            }
        }
    }

    /// The stored form, read back by [`Window::decode`].
    pub fn encode(&self) -> String {
        match self {
            Self::Absolute { start_ms, end_ms } => format!("absolute {start_ms} {end_ms}"),
            Self::Daily {
                start_minute,
                end_minute,
                zone_name,
                ..
            } => format!("daily {start_minute} {end_minute} {zone_name}"),
        }
    }

    pub fn decode(stored: &str) -> Result<Self, String> {
        let parts: Vec<&str> = stored.split(' ').collect();
        let number = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| format!("bad window {stored:?}"))
        };
        match parts.as_slice() {
            ["absolute", start, end] => Self::absolute(number(start)?, number(end)?),
            ["daily", start, end, zone] => {
                Self::daily(number(start)? as u32, number(end)? as u32, zone)
            }
            _ => Err(format!("bad window {stored:?}")),
        }
    }

    /// The wire window named `field`; `Ok(None)` when absent.
    pub fn from_wire(
        field: &str,
        window: Option<&common::DeliveryWindow>,
    ) -> Result<Option<Self>, FieldError> {
        let Some(kind) = window.and_then(|w| w.kind.as_ref()) else {
            return Ok(None);
        };
        let window = match kind {
            common::delivery_window::Kind::Absolute(absolute) => {
                let (Some(start), Some(end)) = (&absolute.start, &absolute.end) else {
                    return Err(FieldError::new(
                        format!("{field}.absolute"),
                        "needs both start and end",
                    ));
                };
                let start = crate::validate::instant(&format!("{field}.absolute.start"), start)?;
                let end = crate::validate::instant(&format!("{field}.absolute.end"), end)?;
                Self::absolute(start, end)
                    .map_err(|reason| FieldError::new(format!("{field}.absolute"), reason))?
            }
            common::delivery_window::Kind::Daily(daily) => {
                if daily.time_zone.is_empty() {
                    return Err(FieldError::new(
                        format!("{field}.daily.time_zone"),
                        "is required",
                    ));
                }
                Self::daily(daily.start_minute, daily.end_minute, &daily.time_zone).map_err(
                    |reason| {
                        let part = if reason.contains("zone") {
                            "time_zone"
                        } else {
                            "start_minute"
                        };
                        FieldError::new(format!("{field}.daily.{part}"), reason)
                    },
                )?
            }
        };
        Ok(Some(window))
    }

    pub fn to_wire(&self) -> common::DeliveryWindow {
        let kind = match self {
            Self::Absolute { start_ms, end_ms } => {
                common::delivery_window::Kind::Absolute(common::AbsoluteWindow {
                    start: Some(to_timestamp(*start_ms)),
                    end: Some(to_timestamp(*end_ms)),
                })
            }
            Self::Daily {
                start_minute,
                end_minute,
                zone_name,
                ..
            } => common::delivery_window::Kind::Daily(common::DailyWindow {
                start_minute: *start_minute,
                end_minute: *end_minute,
                time_zone: zone_name.clone(),
            }),
        };
        common::DeliveryWindow { kind: Some(kind) }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hhmm = |m: &u32| format!("{:02}:{:02}", m / 60, m % 60);
        match self {
            Self::Absolute { start_ms, end_ms } => {
                write!(f, "{} to {}", rfc3339(*start_ms), rfc3339(*end_ms))
            }
            Self::Daily {
                start_minute,
                end_minute,
                zone_name,
                ..
            } => write!(
                f,
                "daily {}-{} {zone_name}",
                hhmm(start_minute),
                hhmm(end_minute)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn daily_window_in_tokyo() {
        let window = Window::daily(18 * 60, 21 * 60, "Asia/Tokyo").unwrap();
        // 10:00 Tokyo is 01:00 UTC: the window opens at 09:00 UTC today.
        let (open, close) = window.opening(ms("2026-11-26T01:00:00Z")).unwrap();
        assert_eq!(open, ms("2026-11-26T09:00:00Z"));
        assert_eq!(close, ms("2026-11-26T12:00:00Z"));
        // Inside the window: the current opening.
        assert_eq!(
            window.opening(ms("2026-11-26T10:00:00Z")),
            Some((open, close))
        );
        // After it: tomorrow's.
        assert_eq!(
            window.opening(ms("2026-11-26T12:00:00Z")).unwrap().0,
            ms("2026-11-27T09:00:00Z")
        );
    }

    #[test]
    fn daily_window_across_midnight() {
        let window = Window::daily(22 * 60, 2 * 60, "UTC").unwrap();
        // 01:00 is inside the opening that began yesterday at 22:00.
        assert_eq!(
            window.opening(ms("2026-11-26T01:00:00Z")),
            Some((ms("2026-11-25T22:00:00Z"), ms("2026-11-26T02:00:00Z")))
        );
        assert_eq!(
            window.opening(ms("2026-11-26T03:00:00Z")),
            Some((ms("2026-11-26T22:00:00Z"), ms("2026-11-27T02:00:00Z")))
        );
    }

    #[test]
    fn dst_gap_opens_forwards() {
        // 02:30 does not exist in New York on 2026-03-08.
        let window = Window::daily(2 * 60 + 30, 4 * 60, "America/New_York").unwrap();
        let (open, close) = window.opening(ms("2026-03-08T05:00:00Z")).unwrap();
        assert_eq!(open, ms("2026-03-08T07:30:00Z"));
        assert_eq!(close, ms("2026-03-08T08:00:00Z"));
    }

    #[test]
    fn absolute_window() {
        let window = Window::absolute(1_000, 2_000).unwrap();
        assert_eq!(window.opening(0), Some((1_000, 2_000)));
        assert_eq!(window.opening(1_999), Some((1_000, 2_000)));
        assert_eq!(window.opening(2_000), None);
    }

    #[test]
    fn bad_windows_are_refused() {
        assert!(Window::absolute(2_000, 1_000).is_err());
        assert!(Window::daily(60, 60, "UTC").is_err());
        assert!(Window::daily(0, 1_440, "UTC").is_err());
        assert!(
            Window::daily(0, 60, "Mars/Olympus")
                .unwrap_err()
                .contains("zone")
        );
    }

    #[test]
    fn stored_form_round_trips() {
        for window in [
            Window::absolute(5, 9).unwrap(),
            Window::daily(1080, 1260, "Asia/Tokyo").unwrap(),
        ] {
            assert_eq!(Window::decode(&window.encode()).unwrap(), window);
        }
    }
}
