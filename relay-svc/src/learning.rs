//! Learning which channel gets each person to open: a Beta-Bernoulli bandit
//! per person and channel. A person's own deliveries and opens sit on top of
//! a prior made from the open rate of people like them (their consented
//! gender and age decade, in the enterprise's own figures) or, without
//! enough of those, the hub's (so someone new starts from what works for
//! people like them), and each message draws one channel
//! per person by Thompson sampling — but only a bounded share of recipients
//! may be sent something other than their current best guess.
//!
//! Everything is deterministic given the message and the person (the random
//! stream is seeded from both), so a decision can be replayed and explained.

use std::collections::HashMap;

use chukei_proto::rng::Rng;

use crate::targeting::Channel;

/// How many deliveries' worth of weight the hub's rate has for a person with
/// no history of their own.
pub const PRIOR_STRENGTH: f64 = 2.0;

/// The share of a message's recipients `best` may send something other than
/// their current best guess, to keep learning.
pub const EXPLORE_SHARE: f64 = 0.1;

/// How many of the messages delivered were opened: a person's record on a
/// channel, a segment's or the hub's rate, a place's at an hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenCounts {
    pub delivered: u64,
    pub opened: u64,
}

impl OpenCounts {
    /// From summed database counts (never negative).
    pub fn counted(delivered: i64, opened: i64) -> Self {
        Self {
            delivered: delivered.max(0) as u64,
            opened: opened.max(0) as u64,
        }
    }
}

/// What was chosen for one person, and whether it was exploration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Choice {
    pub channel: Channel,
    /// Not the channel with the highest expected open rate: tried to learn.
    pub explored: bool,
}

/// People alike for the prior: their consented gender and age decade with
/// the message's enterprise (`""` / `-1` where not shared).
pub type Segment = (String, i64);

/// Deliveries a segment needs on a channel before its own rate replaces
/// the hub's in the prior.
pub const MIN_SEGMENT_DELIVERIES: u64 = 50;

/// (channel, alpha, beta) of each candidate's prior.
type Priors = Vec<(Channel, f64, f64)>;

/// The bandit for one message: its candidate channels with their priors,
/// the hub's and each segment's.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelBandit {
    hub: Priors,
    segments: HashMap<Segment, Priors>,
    /// At most this share of recipients is explored.
    explore_share: f64,
}

impl ChannelBandit {
    /// Priors Beta(1 + s·p, 1 + s·(1 − p)) with s = [`PRIOR_STRENGTH`] and p
    /// the smoothed open rate of the person's segment on the channel (the
    /// enterprise's figures, when it has [`MIN_SEGMENT_DELIVERIES`]), else the
    /// hub's.
    pub fn new(
        candidates: &[Channel],
        hub: &[(Channel, OpenCounts)],
        segments: &[(Segment, Channel, OpenCounts)],
        explore_share: f64,
    ) -> Self {
        let prior = |channel: Channel, rate: OpenCounts| {
            let p = (rate.opened as f64 + 1.0) / (rate.delivered as f64 + 2.0);
            (
                channel,
                1.0 + PRIOR_STRENGTH * p,
                1.0 + PRIOR_STRENGTH * (1.0 - p),
            )
        };
        let hub_rate = |channel: Channel| {
            hub.iter()
                .find(|(c, _)| *c == channel)
                .map(|(_, r)| *r)
                .unwrap_or_default()
        };
        let hub_priors: Priors = candidates
            .iter()
            .map(|channel| prior(*channel, hub_rate(*channel)))
            .collect();
        let mut by_segment: HashMap<&Segment, HashMap<Channel, OpenCounts>> = HashMap::new();
        for (segment, channel, rate) in segments {
            if rate.delivered >= MIN_SEGMENT_DELIVERIES {
                by_segment
                    .entry(segment)
                    .or_default()
                    .insert(*channel, *rate);
            }
        }
        let segments = by_segment
            .into_iter()
            .map(|(segment, rates)| {
                let priors = candidates
                    .iter()
                    .map(|channel| {
                        prior(
                            *channel,
                            rates
                                .get(channel)
                                .copied()
                                .unwrap_or_else(|| hub_rate(*channel)),
                        )
                    })
                    .collect();
                (segment.clone(), priors)
            })
            .collect();
        Self {
            hub: hub_priors,
            segments,
            explore_share: explore_share.clamp(0.0, 1.0),
        }
    }

    pub fn explore_share(&self) -> f64 {
        self.explore_share
    }

    /// The channel for one person of `segment` with `history` (per
    /// channel), drawing from `rng`.
    pub fn choose(
        &self,
        segment: Option<&Segment>,
        history: &HashMap<Channel, OpenCounts>,
        rng: &mut Rng,
    ) -> Choice {
        let priors = segment
            .and_then(|s| self.segments.get(s))
            .unwrap_or(&self.hub);
        let posterior = |channel: Channel, alpha: f64, beta: f64| {
            let seen = history.get(&channel).copied().unwrap_or_default();
            let opened = seen.opened.min(seen.delivered) as f64;
            (alpha + opened, beta + (seen.delivered as f64 - opened))
        };
        let mut greedy = priors[0].0;
        let mut greedy_mean = f64::MIN;
        for (channel, alpha, beta) in priors {
            let (a, b) = posterior(*channel, *alpha, *beta);
            let mean = a / (a + b);
            if mean > greedy_mean {
                greedy = *channel;
                greedy_mean = mean;
            }
        }
        if rng.unit() >= self.explore_share {
            return Choice {
                channel: greedy,
                explored: false,
            };
        }
        let mut sampled = greedy;
        let mut best_draw = f64::MIN;
        for (channel, alpha, beta) in priors {
            let (a, b) = posterior(*channel, *alpha, *beta);
            let draw = rng.beta(a, b);
            if draw > best_draw {
                sampled = *channel;
                best_draw = draw;
            }
        }
        Choice {
            channel: sampled,
            explored: sampled != greedy,
        }
    }

    /// Chooses for every person of `message_id`: `people` are user ids with
    /// their segment, `history` holds `(user_id, channel, evidence)` rows.
    pub fn assign<'a>(
        &self,
        message_id: &str,
        people: impl IntoIterator<Item = (&'a str, Option<&'a Segment>)>,
        history: &[(String, Channel, OpenCounts)],
    ) -> HashMap<&'a str, Choice> {
        let mut by_person: HashMap<&str, HashMap<Channel, OpenCounts>> = HashMap::new();
        for (user_id, channel, evidence) in history {
            let seen = by_person
                .entry(user_id.as_str())
                .or_default()
                .entry(*channel)
                .or_default();
            seen.delivered += evidence.delivered;
            seen.opened += evidence.opened;
        }
        let empty = HashMap::new();
        people
            .into_iter()
            .map(|(user_id, segment)| {
                let mut rng = Rng::for_labels(0, &[message_id, user_id]);
                let history = by_person.get(user_id).unwrap_or(&empty);
                (user_id, self.choose(segment, history, &mut rng))
            })
            .collect()
    }
}

const HOUR_MS: i64 = 3_600_000;

/// Opens a person needs before the hour they open most is trusted.
pub const MIN_OPENS_FOR_HOUR: u64 = 2;

/// Deliveries a place and hour need before their open rate counts.
pub const MIN_DELIVERIES_FOR_PLACE_HOUR: u64 = 20;

/// The hours that start within `[now, now + within_ms)` (the current one as
/// `now`), each with its hour of day (UTC).
fn upcoming_hours(now: i64, within_ms: i64) -> Vec<(i64, usize)> {
    let hour_of = |at: i64| (at.div_euclid(HOUR_MS).rem_euclid(24)) as usize;
    let mut hours = vec![(now, hour_of(now))];
    let mut start = (now.div_euclid(HOUR_MS) + 1) * HOUR_MS;
    while start < now.saturating_add(within_ms) {
        hours.push((start, hour_of(start)));
        start += HOUR_MS;
    }
    hours
}

/// When to send to a person who opened `opens[h]` messages in UTC hour `h`:
/// the upcoming hour (within the horizon) they opened most in, the earliest
/// on a tie; at once when they have too few opens to tell. Returns the
/// instant and why.
pub fn best_hour(opens: &[u64; 24], now: i64, within_ms: i64) -> (i64, String) {
    if opens.iter().sum::<u64>() < MIN_OPENS_FOR_HOUR {
        return (
            now,
            "send time: too few opens to choose an hour, sent at once".to_owned(),
        );
    }
    let (at, hour) = upcoming_hours(now, within_ms)
        .into_iter()
        .rev()
        .max_by_key(|(_, hour)| opens[*hour])
        .expect("the current hour is always upcoming");
    (
        at,
        format!("send time: {hour:02}:00 UTC, the hour this person opens most"),
    )
}

/// Place and hour targeting for a person last seen at `place`: the upcoming
/// hour (within the horizon) whose open rate at that place, in `rates`
/// (delivered/opened by place and UTC hour of day), is highest and at least
/// `min_rate_permille`. `Err` says why the person is skipped.
pub fn place_hour(
    place: Option<&str>,
    rates: &HashMap<(String, usize), OpenCounts>,
    min_rate_permille: i64,
    now: i64,
    within_ms: i64,
) -> Result<(i64, String), String> {
    let Some(place) = place else {
        return Err("skipped: place and hour targeting — where this person is is not known".into());
    };
    let rate = |hour: usize| {
        rates
            .get(&(place.to_owned(), hour))
            .filter(|e| e.delivered >= MIN_DELIVERIES_FOR_PLACE_HOUR)
            .map(|e| e.opened * 1000 / e.delivered)
    };
    upcoming_hours(now, within_ms)
        .into_iter()
        .rev()
        .filter_map(|(at, hour)| rate(hour).map(|r| (at, hour, r)))
        .filter(|(.., r)| *r as i64 >= min_rate_permille)
        .max_by_key(|(.., r)| *r)
        .map(|(at, hour, r)| {
            (
                at,
                format!(
                    "send time: {hour:02}:00 UTC, when people at {place} open {:.1}% (at least {:.1}% asked)",
                    r as f64 / 10.0,
                    min_rate_permille as f64 / 10.0
                ),
            )
        })
        .ok_or_else(|| {
            format!(
                "skipped: place and hour targeting — no hour ahead reaches {:.1}% at {place}",
                min_rate_permille as f64 / 10.0
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(delivered: u64, opened: u64) -> OpenCounts {
        OpenCounts { delivered, opened }
    }

    /// A simulated person whose true open rates are known: the bandit's
    /// choices converge on their best channel, though the hub prefers another.
    #[test]
    fn converges_to_a_persons_best_channel_in_a_deterministic_simulation() {
        let truth = [
            (Channel::Rcs, 0.2),
            (Channel::Sms, 0.7),
            (Channel::Email, 0.1),
        ];
        let hub = [
            (Channel::Rcs, rate(1000, 500)),
            (Channel::Sms, rate(1000, 300)),
            (Channel::Email, rate(1000, 100)),
        ];
        let candidates: Vec<Channel> = truth.iter().map(|(c, _)| *c).collect();
        let bandit = ChannelBandit::new(&candidates, &hub, &[], 0.2);
        let mut outcomes = Rng::new(42);
        let mut history: HashMap<Channel, OpenCounts> = HashMap::new();
        let mut late_best = 0;
        for round in 0..200 {
            let mut rng = Rng::for_labels(0, &[&format!("m{round}"), "u"]);
            let choice = bandit.choose(None, &history, &mut rng);
            let rate = truth.iter().find(|(c, _)| *c == choice.channel).unwrap().1;
            let seen = history.entry(choice.channel).or_default();
            seen.delivered += 1;
            seen.opened += u64::from(outcomes.unit() < rate);
            if round >= 150 && choice.channel == Channel::Sms {
                late_best += 1;
            }
        }
        assert!(
            late_best >= 45,
            "SMS chosen {late_best} of the last 50 times"
        );
    }

    #[test]
    fn best_hour_picks_the_upcoming_hour_opened_most() {
        let mut opens = [0; 24];
        opens[20] = 5;
        opens[8] = 3;
        let now = 10 * HOUR_MS + 15 * 60_000; // 10:15 UTC
        assert_eq!(best_hour(&opens, now, 24 * HOUR_MS).0, 20 * HOUR_MS);
        // Within 6 hours, 20:00 is out of reach and nothing else was opened:
        // the earliest of the equally good hours, now.
        assert_eq!(best_hour(&opens, now, 6 * HOUR_MS).0, now);
        // At 21:30 the next 08:00 is tomorrow's.
        let late = 21 * HOUR_MS + 30 * 60_000;
        assert_eq!(best_hour(&opens, late, 12 * HOUR_MS).0, 32 * HOUR_MS);
        let (at, why) = best_hour(&[0; 24], now, 24 * HOUR_MS);
        assert_eq!(at, now);
        assert!(why.contains("too few opens"));
    }

    #[test]
    fn place_hour_needs_the_rate_and_the_sample() {
        let mut rates = HashMap::new();
        let evidence = |delivered, opened| OpenCounts { delivered, opened };
        rates.insert(("tokyo".to_owned(), 12), evidence(100, 60));
        rates.insert(("tokyo".to_owned(), 18), evidence(100, 40));
        rates.insert(("osaka".to_owned(), 12), evidence(10, 9));
        let now = 9 * HOUR_MS;
        let (at, why) = place_hour(Some("tokyo"), &rates, 500, now, 24 * HOUR_MS).unwrap();
        assert_eq!(at, 12 * HOUR_MS);
        assert!(why.contains("60.0%"), "{why}");
        assert!(place_hour(Some("tokyo"), &rates, 700, now, 24 * HOUR_MS).is_err());
        // Osaka's 90% rests on ten deliveries: not enough.
        assert!(place_hour(Some("osaka"), &rates, 500, now, 24 * HOUR_MS).is_err());
        assert!(place_hour(None, &rates, 100, now, 24 * HOUR_MS).is_err());
    }

    #[test]
    fn a_segment_with_enough_data_sets_its_peoples_prior() {
        let hub = [
            (Channel::Rcs, rate(1000, 500)),
            (Channel::Sms, rate(1000, 200)),
        ];
        let older: Segment = ("female".into(), 60);
        let young: Segment = ("male".into(), 20);
        let segments = [
            (older.clone(), Channel::Sms, rate(50, 40)),
            // Too little to go on: the hub's rate stands.
            (young.clone(), Channel::Sms, rate(5, 5)),
        ];
        let bandit = ChannelBandit::new(&[Channel::Rcs, Channel::Sms], &hub, &segments, 0.0);
        let none = HashMap::new();
        let mut rng = Rng::new(1);
        assert_eq!(
            bandit.choose(Some(&older), &none, &mut rng).channel,
            Channel::Sms
        );
        assert_eq!(
            bandit.choose(Some(&young), &none, &mut rng).channel,
            Channel::Rcs
        );
        assert_eq!(bandit.choose(None, &none, &mut rng).channel, Channel::Rcs);
    }

    #[test]
    fn exploration_stays_within_its_share_and_is_repeatable() {
        let hub = [(Channel::Rcs, rate(100, 50))];
        let bandit = ChannelBandit::new(&[Channel::Rcs, Channel::Sms], &hub, &[], 0.1);
        let people: Vec<String> = (0..5_000).map(|i| format!("user-{i}")).collect();
        let choices = bandit.assign("m1", people.iter().map(|p| (p.as_str(), None)), &[]);
        let explored = choices.values().filter(|c| c.explored).count();
        assert!(
            explored > 0 && explored <= 600,
            "{explored} of 5000 explored"
        );
        assert!(
            choices
                .values()
                .filter(|c| !c.explored)
                .all(|c| c.channel == Channel::Rcs)
        );
        let again = bandit.assign("m1", people.iter().map(|p| (p.as_str(), None)), &[]);
        assert_eq!(choices, again);
    }
}
