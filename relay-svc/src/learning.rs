//! Learning which channel gets each person to open: a Beta-Bernoulli bandit
//! per person and channel. A person's own deliveries and opens sit on top of
//! a prior made from the hub's open rate for the channel (so someone new
//! starts from what works for everyone), and each message draws one channel
//! per person by Thompson sampling — but only a bounded share of recipients
//! may be sent something other than their current best guess.
//!
//! Everything is deterministic given the message and the person (the random
//! stream is seeded from both), so a decision can be replayed and explained.

use std::collections::HashMap;

use chukei_proto::rng::Rng;

use crate::storage::ChannelRate;
use crate::targeting::Channel;

/// How many deliveries' worth of weight the hub's rate has for a person with
/// no history of their own.
pub const PRIOR_STRENGTH: f64 = 4.0;

/// The share of a message's recipients `best` may send something other than
/// their current best guess, to keep learning.
pub const EXPLORE_SHARE: f64 = 0.1;

/// A person's record on one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    pub delivered: u64,
    pub opened: u64,
}

/// What was chosen for one person, and whether it was exploration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Choice {
    pub channel: Channel,
    /// Not the channel with the highest expected open rate: tried to learn.
    pub explored: bool,
}

/// The bandit for one message: its candidate channels with their priors.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelBandit {
    /// (channel, alpha, beta) of each candidate's prior.
    priors: Vec<(Channel, f64, f64)>,
    /// At most this share of recipients is explored.
    explore_share: f64,
}

impl ChannelBandit {
    /// Priors from the hub's rates: Beta(1 + s·p, 1 + s·(1 − p)) with p the
    /// hub's smoothed rate and s = [`PRIOR_STRENGTH`].
    pub fn new(candidates: &[Channel], hub: &[(Channel, ChannelRate)], explore_share: f64) -> Self {
        let priors = candidates
            .iter()
            .map(|channel| {
                let rate = hub
                    .iter()
                    .find(|(c, _)| c == channel)
                    .map(|(_, r)| *r)
                    .unwrap_or_default();
                let p = (rate.opened as f64 + 1.0) / (rate.delivered as f64 + 2.0);
                (
                    *channel,
                    1.0 + PRIOR_STRENGTH * p,
                    1.0 + PRIOR_STRENGTH * (1.0 - p),
                )
            })
            .collect();
        Self {
            priors,
            explore_share: explore_share.clamp(0.0, 1.0),
        }
    }

    pub fn explore_share(&self) -> f64 {
        self.explore_share
    }

    /// The channel for one person with `history` (per channel), drawing from `rng`.
    pub fn choose(&self, history: &HashMap<Channel, Evidence>, rng: &mut Rng) -> Choice {
        let posterior = |channel: Channel, alpha: f64, beta: f64| {
            let seen = history.get(&channel).copied().unwrap_or_default();
            let opened = seen.opened.min(seen.delivered) as f64;
            (alpha + opened, beta + (seen.delivered as f64 - opened))
        };
        let mut greedy = self.priors[0].0;
        let mut greedy_mean = f64::MIN;
        for (channel, alpha, beta) in &self.priors {
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
        for (channel, alpha, beta) in &self.priors {
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

    /// Chooses for every person of `message_id`; `history` holds
    /// `(user_id, channel, evidence)` rows.
    pub fn assign<'a>(
        &self,
        message_id: &str,
        people: impl IntoIterator<Item = &'a str>,
        history: &[(String, Channel, Evidence)],
    ) -> HashMap<&'a str, Choice> {
        let mut by_person: HashMap<&str, HashMap<Channel, Evidence>> = HashMap::new();
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
            .map(|user_id| {
                let mut rng = Rng::for_labels(0, &[message_id, user_id]);
                let history = by_person.get(user_id).unwrap_or(&empty);
                (user_id, self.choose(history, &mut rng))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (
                Channel::Rcs,
                ChannelRate {
                    delivered: 1000,
                    opened: 500,
                },
            ),
            (
                Channel::Sms,
                ChannelRate {
                    delivered: 1000,
                    opened: 300,
                },
            ),
            (
                Channel::Email,
                ChannelRate {
                    delivered: 1000,
                    opened: 100,
                },
            ),
        ];
        let candidates: Vec<Channel> = truth.iter().map(|(c, _)| *c).collect();
        let bandit = ChannelBandit::new(&candidates, &hub, 0.2);
        let mut outcomes = Rng::new(42);
        let mut history: HashMap<Channel, Evidence> = HashMap::new();
        let mut late_best = 0;
        for round in 0..200 {
            let mut rng = Rng::for_labels(0, &[&format!("m{round}"), "u"]);
            let choice = bandit.choose(&history, &mut rng);
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
    fn exploration_stays_within_its_share_and_is_repeatable() {
        let hub = [(
            Channel::Rcs,
            ChannelRate {
                delivered: 100,
                opened: 50,
            },
        )];
        let bandit = ChannelBandit::new(&[Channel::Rcs, Channel::Sms], &hub, 0.1);
        let people: Vec<String> = (0..5_000).map(|i| format!("user-{i}")).collect();
        let choices = bandit.assign("m1", people.iter().map(String::as_str), &[]);
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
        let again = bandit.assign("m1", people.iter().map(String::as_str), &[]);
        assert_eq!(choices, again);
    }
}
