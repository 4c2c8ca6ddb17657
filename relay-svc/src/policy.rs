//! Delivery control's domain: how a message chooses and retries channels
//! (the policy), when it may go (window, expiry), what follows an open, and
//! how much attention a person has left (fatigue). Pure rules; the set-based
//! statements that apply them live in `storage::planning`.

use std::fmt;

use chukei_proto::window::Window;

use crate::content::{Channel, Content};

/// The most resends a `resend` policy may ask for.
pub const MAX_RESENDS: u32 = 10;

/// How channels are chosen and retried for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// The named channels in order: the first the terminal supports.
    Fixed,
    /// The person's most-opened channel, else the first named one.
    MostUsed,
    /// Next channel when not opened within the timeout.
    Fallback,
    /// Every named channel at once.
    Multi,
    /// The same channel again when not delivered/opened within the timeout.
    Resend,
    /// The named channel with the best open rate.
    Best,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::MostUsed => "most_used",
            Self::Fallback => "fallback",
            Self::Multi => "multi",
            Self::Resend => "resend",
            Self::Best => "best",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "fixed" => Self::Fixed,
            "most_used" => Self::MostUsed,
            "fallback" => Self::Fallback,
            "multi" => Self::Multi,
            "resend" => Self::Resend,
            "best" => Self::Best,
            _ => return None,
        })
    }
}

/// A message's delivery policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub kind: PolicyKind,
    /// In order; empty only for `fixed`, meaning the carrier's default channel.
    pub channels: Vec<Channel>,
    /// Fallback and resend: how long an attempt has before the next (ms).
    pub timeout_ms: i64,
    pub max_resends: u32,
    /// Resend while not delivered (instead of while not opened).
    pub resend_until_delivered: bool,
}

/// Why the policy looks at an attempt again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Its timer ran out without the open (or delivery) it waited for.
    Timeout,
    /// The terminal (or carrier) cannot take its channel.
    Unsupported,
}

impl Policy {
    /// Fixed on one channel, or on the carrier's default when `None`.
    pub fn fixed(channel: Option<Channel>) -> Self {
        Self {
            kind: PolicyKind::Fixed,
            channels: channel.into_iter().collect(),
            timeout_ms: 0,
            max_resends: 0,
            resend_until_delivered: false,
        }
    }

    /// Whether a person can get at most one attempt per carrier: no timer,
    /// no second channel, and no list to fall back on when a channel is
    /// unsupported.
    pub fn at_most_one_attempt(&self) -> bool {
        match self.kind {
            PolicyKind::Fixed | PolicyKind::Best => self.channels.len() <= 1,
            PolicyKind::MostUsed => self.channels.is_empty(),
            PolicyKind::Fallback | PolicyKind::Multi | PolicyKind::Resend => false,
        }
    }

    /// Whether handed-over attempts start a timer.
    pub fn has_timer(&self) -> bool {
        matches!(self.kind, PolicyKind::Fallback | PolicyKind::Resend)
    }

    /// The attempt after `attempt` on `channel`, or `None` when the policy is
    /// done with this person: its channel and the reason it exists.
    pub fn next(
        &self,
        channel: Option<Channel>,
        attempt: u32,
        trigger: Trigger,
    ) -> Option<(Option<Channel>, String)> {
        let name = channel_name(channel);
        let after_in_list = || {
            let position = self.channels.iter().position(|c| Some(*c) == channel);
            let next = match position {
                Some(index) => self.channels.get(index + 1).copied(),
                // A channel chosen outside the list (most used, best): the list from the start.
                None => self.channels.iter().copied().find(|c| Some(*c) != channel),
            };
            next.map(Some)
        };
        match (self.kind, trigger) {
            (PolicyKind::Multi, _) => None,
            (PolicyKind::Resend, Trigger::Unsupported) => None,
            (PolicyKind::Resend, Trigger::Timeout) => (attempt < self.max_resends).then(|| {
                let waited = if self.resend_until_delivered {
                    "delivered"
                } else {
                    "opened"
                };
                (
                    channel,
                    format!(
                        "resend {}/{}: not {waited} within {}",
                        attempt + 1,
                        self.max_resends,
                        duration(self.timeout_ms)
                    ),
                )
            }),
            (PolicyKind::Fallback, Trigger::Timeout) => after_in_list().map(|next| {
                (
                    next,
                    format!(
                        "fallback: {name} not opened within {}",
                        duration(self.timeout_ms)
                    ),
                )
            }),
            (_, Trigger::Unsupported) => {
                after_in_list().map(|next| (next, format!("{name} not supported by the terminal")))
            }
            (_, Trigger::Timeout) => None,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = if self.channels.is_empty() {
            "carrier default".to_owned()
        } else {
            self.channels
                .iter()
                .map(|c| channel_name(Some(*c)))
                .collect::<Vec<_>>()
                .join(match self.kind {
                    PolicyKind::Fallback => " → ",
                    PolicyKind::Multi => " + ",
                    _ => ", ",
                })
        };
        match self.kind {
            PolicyKind::Fixed => write!(f, "fixed {list}"),
            PolicyKind::MostUsed => write!(f, "most used channel (else {list})"),
            PolicyKind::Fallback => {
                write!(f, "fallback {list} after {}", duration(self.timeout_ms))
            }
            PolicyKind::Multi => write!(f, "multi {list}"),
            PolicyKind::Resend => write!(
                f,
                "resend {list} up to {} times every {} until {}",
                self.max_resends,
                duration(self.timeout_ms),
                if self.resend_until_delivered {
                    "delivered"
                } else {
                    "opened"
                }
            ),
            PolicyKind::Best => write!(f, "best of {list}"),
        }
    }
}

/// Where a delivery window is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowMode {
    /// The relay hands over only inside the window.
    HeldAtRelay,
    /// The relay hands over at once; the carrier holds until the window.
    AtCarrier,
}

/// Lowest first: low-priority messages are skipped first when a person tires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Low = 1,
    Normal = 2,
    High = 3,
}

impl Priority {
    pub fn number(self) -> i64 {
        self as i64
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        }
    }

    pub fn from_number(number: i64) -> Self {
        match number {
            1 => Self::Low,
            3 => Self::High,
            _ => Self::Normal,
        }
    }
}

/// Sent to each person who opens the message, after `delay_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowUp {
    pub content: Content,
    pub delay_ms: i64,
    pub channel: Option<Channel>,
}

/// When a message may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    pub window: Option<Window>,
    pub mode: WindowMode,
    /// Absent: the relay's default time to live.
    pub expires_at: Option<i64>,
    /// Each person's own send time, from what the hub has seen (never with a window).
    pub send_time: Option<SendTime>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            window: None,
            mode: WindowMode::HeldAtRelay,
            expires_at: None,
            send_time: None,
        }
    }
}

/// The longest horizon a per-person send time may look ahead.
pub const MAX_SEND_TIME_HORIZON_MS: i64 = 24 * 3_600_000;

/// A per-person send time, chosen when the person's attempt is planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendTime {
    /// At the hour of day the person opens most, within `within_ms`.
    BestHour { within_ms: i64 },
    /// Only people whose current place has an open rate of at least
    /// `min_rate_permille` at some hour within `within_ms` (in the
    /// enterprise's own figures), at the best such hour; the others are skipped.
    PlaceHour {
        min_rate_permille: i64,
        within_ms: i64,
    },
}

impl SendTime {
    pub fn within_ms(self) -> i64 {
        match self {
            Self::BestHour { within_ms } | Self::PlaceHour { within_ms, .. } => within_ms,
        }
    }

    /// As stored in `messages.send_time`.
    pub fn encode(self) -> String {
        match self {
            Self::BestHour { within_ms } => format!("best_hour:{within_ms}"),
            Self::PlaceHour {
                min_rate_permille,
                within_ms,
            } => format!("place_hour:{min_rate_permille}:{within_ms}"),
        }
    }

    pub fn decode(stored: &str) -> Option<Self> {
        let mut parts = stored.split(':');
        match (parts.next()?, parts.next(), parts.next()) {
            ("best_hour", Some(within), None) => Some(Self::BestHour {
                within_ms: within.parse().ok()?,
            }),
            ("place_hour", Some(rate), Some(within)) => Some(Self::PlaceHour {
                min_rate_permille: rate.parse().ok()?,
                within_ms: within.parse().ok()?,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for SendTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BestHour { within_ms } => write!(
                f,
                "each person at the hour they open most, within {}",
                duration(*within_ms)
            ),
            Self::PlaceHour {
                min_rate_permille,
                within_ms,
            } => write!(
                f,
                "only people whose place opens at least {:.1}% at some hour within {}, at the best such hour",
                *min_rate_permille as f64 / 10.0,
                duration(*within_ms)
            ),
        }
    }
}

/// The attention settings (hub-wide, from the relay's flags): quiet periods and fatigue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Campaign messages per person per day while engaged; 0 turns the per-person cap off.
    pub daily_cap: i64,
    /// Campaign messages per person per day from all enterprises together; 0: no budget.
    pub daily_budget: i64,
    /// Quiet period either side of a targeted message (ms); 0 turns it off.
    pub quiet_period_ms: i64,
}

/// The open-rate trend score, per mille: where a person starts, and the
/// score at or above which they get the full cap. A newcomer keeps the full
/// cap for their first five or so campaign messages, before any of them
/// could have been opened.
pub const SCORE_START: i64 = 500;
pub const SCORE_ENGAGED: i64 = 250;
/// Each campaign send moves the score 1/8 of the way towards 0, each open 1/4
/// of the way towards 1000 (steady state 2000p / (1 + 2p) for an open rate
/// p): a person who opens about one message in six or more holds the full
/// cap, one who stops opening falls to one message a day within days.
pub const SCORE_SEND_SHIFT: i64 = 8;
pub const SCORE_OPEN_SHIFT: i64 = 4;

impl AttentionConfig {
    /// The SQL expression for a person's cap today for a message of
    /// `priority`, from their `score` column; `None` when uncapped. Integer
    /// arithmetic only, the same on both engines: the cap shrinks in proportion
    /// to the score below the engaged level, never below one message a day, and
    /// low-priority messages get half of it.
    pub fn cap_expression(&self, priority: Priority, score: &str) -> Option<String> {
        if self.daily_cap <= 0 || priority == Priority::High {
            return None;
        }
        let cap = self.daily_cap;
        let scaled = format!("(({cap} * {score}) / {SCORE_ENGAGED})");
        let person = format!(
            "(CASE WHEN {scaled} >= {cap} THEN {cap} WHEN {scaled} < 1 THEN 1 ELSE {scaled} END)"
        );
        Some(match priority {
            Priority::Low => format!("({person} / 2)"),
            _ => person,
        })
    }
}

/// A channel's name as shown to people ("carrier default" for none).
pub fn channel_name(channel: Option<Channel>) -> &'static str {
    match channel {
        None => "carrier default",
        Some(Channel::Rcs) => "RCS",
        Some(Channel::Sms) => "SMS",
        Some(Channel::Sns) => "SNS",
        Some(Channel::Email) => "e-mail",
    }
}

/// A duration in the largest whole unit that fits ("90s", "15m", "2h", "3d").
pub fn duration(ms: i64) -> String {
    let secs = ms / 1000;
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3_600 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if ms % 1000 == 0 => format!("{s}s"),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(kind: PolicyKind, channels: &[Channel]) -> Policy {
        Policy {
            kind,
            channels: channels.to_vec(),
            timeout_ms: 3_600_000,
            max_resends: 2,
            resend_until_delivered: false,
        }
    }

    #[test]
    fn fallback_walks_the_list_then_stops() {
        let p = policy(PolicyKind::Fallback, &[Channel::Rcs, Channel::Sms]);
        let (next, reason) = p.next(Some(Channel::Rcs), 0, Trigger::Timeout).unwrap();
        assert_eq!(next, Some(Channel::Sms));
        assert_eq!(reason, "fallback: RCS not opened within 1h");
        assert_eq!(p.next(Some(Channel::Sms), 1, Trigger::Timeout), None);
        assert_eq!(
            p.next(Some(Channel::Rcs), 0, Trigger::Unsupported)
                .unwrap()
                .0,
            Some(Channel::Sms)
        );
    }

    #[test]
    fn resend_stops_at_the_limit_and_on_unsupported() {
        let p = policy(PolicyKind::Resend, &[Channel::Sms]);
        assert_eq!(
            p.next(Some(Channel::Sms), 0, Trigger::Timeout).unwrap().1,
            "resend 1/2: not opened within 1h"
        );
        assert!(p.next(Some(Channel::Sms), 1, Trigger::Timeout).is_some());
        assert_eq!(p.next(Some(Channel::Sms), 2, Trigger::Timeout), None);
        assert_eq!(p.next(Some(Channel::Sms), 0, Trigger::Unsupported), None);
    }

    #[test]
    fn chosen_channels_fall_back_to_the_list_when_unsupported() {
        let p = policy(PolicyKind::MostUsed, &[Channel::Sms, Channel::Email]);
        // The person's most used channel was RCS, which their new terminal lacks.
        assert_eq!(
            p.next(Some(Channel::Rcs), 0, Trigger::Unsupported)
                .unwrap()
                .0,
            Some(Channel::Sms)
        );
        assert_eq!(p.next(Some(Channel::Rcs), 0, Trigger::Timeout), None);
        let multi = policy(PolicyKind::Multi, &[Channel::Sms, Channel::Rcs]);
        assert_eq!(
            multi.next(Some(Channel::Sms), 0, Trigger::Unsupported),
            None
        );
    }

    #[test]
    fn only_policies_without_a_second_attempt_are_single() {
        assert!(Policy::fixed(None).at_most_one_attempt());
        assert!(Policy::fixed(Some(Channel::Sms)).at_most_one_attempt());
        assert!(!policy(PolicyKind::Fixed, &[Channel::Rcs, Channel::Sms]).at_most_one_attempt());
        assert!(!policy(PolicyKind::MostUsed, &[Channel::Sms]).at_most_one_attempt());
        assert!(policy(PolicyKind::MostUsed, &[]).at_most_one_attempt());
        assert!(!policy(PolicyKind::Resend, &[Channel::Sms]).at_most_one_attempt());
        assert!(!policy(PolicyKind::Multi, &[Channel::Sms, Channel::Rcs]).at_most_one_attempt());
    }

    #[test]
    fn policies_read_as_words() {
        assert_eq!(
            policy(PolicyKind::Fallback, &[Channel::Rcs, Channel::Sms]).to_string(),
            "fallback RCS → SMS after 1h"
        );
        assert_eq!(Policy::fixed(None).to_string(), "fixed carrier default");
    }

    #[test]
    fn caps_shrink_with_the_score() {
        let config = AttentionConfig {
            daily_cap: 4,
            daily_budget: 0,
            quiet_period_ms: 0,
        };
        assert!(config.cap_expression(Priority::High, "s").is_none());
        let expr = config.cap_expression(Priority::Normal, "s").unwrap();
        assert!(expr.contains("((4 * s) / 250)"));
        assert!(
            config
                .cap_expression(Priority::Low, "s")
                .unwrap()
                .ends_with("/ 2)")
        );
    }
}
