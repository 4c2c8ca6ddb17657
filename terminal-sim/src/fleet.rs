//! The simulated population: users generated from a seed, each with a
//! subscriber record (provisioned into carriers), one or two carriers, and a
//! behaviour model — open propensity per channel, active hours, home region —
//! plus the consent choices they make when registering with an enterprise.

use chukei_proto::carrier::v1::{AgeGranularity, ConsentChoices, RegionGranularity, Subscriber};

use crate::rng::Rng;

pub const REGIONS: &[&str] = &[
    "tokyo/shibuya",
    "tokyo/shinjuku",
    "tokyo/setagaya",
    "osaka/kita",
    "osaka/naniwa",
    "kanagawa/yokohama",
    "aichi/nagoya",
    "fukuoka/hakata",
    "hokkaido/sapporo",
    "kyoto/sakyo",
];

pub const OCCUPATIONS: &[&str] = &[
    "engineer", "student", "teacher", "nurse", "designer", "sales", "retired", "farmer",
];

const GIVEN_NAMES: &[&str] = &["Aoi", "Haruto", "Yui", "Sota", "Hina", "Ren", "Mei", "Yuto"];
const FAMILY_NAMES: &[&str] = &["Sato", "Suzuki", "Takahashi", "Tanaka", "Ito", "Watanabe"];

/// Hours the simulation's local time is ahead of UTC (Japan).
pub const LOCAL_OFFSET_HOURS: i64 = 9;

/// A simulated person's e-mail address (made up from their id).
fn email_address(user_id: &str) -> String {
    format!("{}@mail.example", user_id.replace('-', "."))
}

/// A simulated person's SNS handle (made up from their id).
fn sns_handle(user_id: &str) -> String {
    format!("@{}", user_id.replace('-', "_"))
}

/// How one person treats messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Behaviour {
    /// Probability of opening a message, by `chukei.common.v1.Channel` value (index 0 unused).
    pub open_propensity: [f64; 5],
    /// Local hour their active window starts, and its length in hours.
    pub active_start_hour: u32,
    pub active_hours: u32,
    /// Chance of being away from home when opening.
    pub away_share: f64,
    /// Chance of registering with any one enterprise the fleet is offered.
    pub registration_share: f64,
    /// Which channels the person's terminal can show, by channel value (index 0 unused).
    pub supports: [bool; 5],
}

/// One simulated person.
#[derive(Clone, Debug, PartialEq)]
pub struct SimUser {
    pub user_id: String,
    pub phone_number: String,
    pub name: String,
    /// `chukei.common.v1.Gender` value.
    pub gender: i32,
    pub birth_date: String,
    pub home_region: String,
    pub occupation: String,
    /// Carrier ids; the first is primary.
    pub carriers: Vec<String>,
    /// Empty when the person gave their carrier none.
    pub email: String,
    pub sns_handle: String,
    pub behaviour: Behaviour,
}

impl SimUser {
    /// The subscriber record one of this user's carriers holds.
    pub fn subscriber(&self, carrier_id: &str) -> Subscriber {
        Subscriber {
            user_id: self.user_id.clone(),
            phone_number: self.phone_number.clone(),
            name: self.name.clone(),
            gender: self.gender,
            birth_date: self.birth_date.clone(),
            region: self.home_region.clone(),
            occupation: self.occupation.clone(),
            primary: self.carriers.first().is_some_and(|c| c == carrier_id),
            email: self.email.clone(),
            sns_handle: self.sns_handle.clone(),
        }
    }

    /// Whether this user registers with `enterprise_id`, and with what consent (seeded).
    pub fn consent_for(&self, seed: u64, enterprise_id: &str) -> Option<ConsentChoices> {
        let mut rng = Rng::for_labels(seed, &["consent", &self.user_id, enterprise_id]);
        if !rng.chance(self.behaviour.registration_share) {
            return None;
        }
        Some(ConsentChoices {
            gender: rng.chance(0.8),
            age: *rng.pick(&[
                AgeGranularity::None as i32,
                AgeGranularity::Exact as i32,
                AgeGranularity::Decade as i32,
                AgeGranularity::Decade as i32,
            ]),
            region: *rng.pick(&[
                RegionGranularity::None as i32,
                RegionGranularity::Prefecture as i32,
                RegionGranularity::City as i32,
            ]),
            occupation: rng.chance(0.5),
        })
    }

    /// Whether this user, registered with `enterprise_id`, later withdraws
    /// what they share with it (seeded; `share` of the registered).
    pub fn withdraws(&self, seed: u64, enterprise_id: &str, share: f64) -> bool {
        share > 0.0
            && Rng::for_labels(seed, &["withdraw", &self.user_id, enterprise_id]).chance(share)
    }

    /// Whether this user also registers with a service of an enterprise they joined.
    pub fn joins_service(&self, seed: u64, service_id: &str) -> bool {
        Rng::for_labels(seed, &["service", &self.user_id, service_id]).chance(0.5)
    }
}

/// A whole fleet, generated from a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    pub seed: u64,
    pub users: Vec<SimUser>,
}

impl Fleet {
    /// `count` users spread over `carriers` (about one in six with a second carrier).
    pub fn generate(seed: u64, count: usize, carriers: &[String]) -> Self {
        assert!(!carriers.is_empty(), "a fleet needs at least one carrier");
        let users = (0..count)
            .map(|index| {
                let user_id = format!("user-{seed}-{index:07}");
                let mut rng = Rng::for_labels(seed, &["user", &user_id]);
                let primary = rng.below(carriers.len() as u64) as usize;
                let mut user_carriers = vec![carriers[primary].clone()];
                if carriers.len() > 1 && rng.chance(1.0 / 6.0) {
                    let second = (primary + 1 + rng.below(carriers.len() as u64 - 1) as usize)
                        % carriers.len();
                    user_carriers.push(carriers[second].clone());
                }
                let base = 0.1 + rng.unit() * 0.7;
                // Drawn from their own stream, so adding them left the rest of a
                // seed's population unchanged.
                let mut device = Rng::for_labels(seed, &["device", &user_id]);
                let email = if device.chance(0.7) {
                    email_address(&user_id)
                } else {
                    String::new()
                };
                let sns_handle = if device.chance(0.5) {
                    sns_handle(&user_id)
                } else {
                    String::new()
                };
                // Every phone takes SMS; RCS needs a recent handset; e-mail and SNS
                // need the app and an address on file.
                let supports = [
                    false,
                    device.chance(0.7),
                    true,
                    !sns_handle.is_empty() && device.chance(0.9),
                    !email.is_empty(),
                ];
                let behaviour = Behaviour {
                    open_propensity: [
                        0.0,
                        (base * 1.1).min(1.0),
                        base * 0.8,
                        base * (0.6 + rng.unit() * 0.6).min(1.0),
                        base * 0.5,
                    ],
                    active_start_hour: 7 + rng.below(14) as u32,
                    active_hours: 2 + rng.below(5) as u32,
                    away_share: 0.1,
                    registration_share: 0.8,
                    supports,
                };
                SimUser {
                    phone_number: format!("+8190{:08}", rng.below(100_000_000)),
                    name: format!("{} {}", rng.pick(FAMILY_NAMES), rng.pick(GIVEN_NAMES)),
                    gender: 1 + rng.below(2) as i32 + i32::from(rng.chance(0.02)),
                    birth_date: format!(
                        "{}-{:02}-{:02}",
                        1946 + rng.below(62),
                        1 + rng.below(12),
                        1 + rng.below(28)
                    ),
                    home_region: rng.pick(REGIONS).to_string(),
                    occupation: rng.pick(OCCUPATIONS).to_string(),
                    carriers: user_carriers,
                    email,
                    sns_handle,
                    behaviour,
                    user_id,
                }
            })
            .collect();
        Self { seed, users }
    }

    /// The same people, each registering with every enterprise offered
    /// (their consent choices still drawn by the model).
    pub fn everyone_registers(mut self) -> Self {
        for user in &mut self.users {
            user.behaviour.registration_share = 1.0;
        }
        self
    }

    /// The same people with terminals that take every channel (and an
    /// address for each), for runs that are not about capabilities.
    pub fn with_every_channel(mut self) -> Self {
        for user in &mut self.users {
            user.behaviour.supports = [false, true, true, true, true];
            if user.email.is_empty() {
                user.email = email_address(&user.user_id);
            }
            if user.sns_handle.is_empty() {
                user.sns_handle = sns_handle(&user.user_id);
            }
        }
        self
    }

    /// Gives each person a favourite channel they open often (45–80%) and
    /// others they rarely open (5–20%): hidden preferences the hub has to
    /// learn, known here for the oracle ([`SimUser::best_channel`]). Seven
    /// in ten follow their generation (under 30: SNS; 30–44: RCS; 45–59:
    /// SMS; 60 and over: e-mail), the rest any channel alike.
    pub fn assign_channel_preferences(&mut self) {
        for user in &mut self.users {
            let mut rng = Rng::for_labels(self.seed, &["channel-preference", &user.user_id]);
            let born: i64 = user
                .birth_date
                .get(..4)
                .and_then(|year| year.parse().ok())
                .unwrap_or(1980);
            let generation = match 2026 - born {
                age if age < 30 => 3,
                age if age < 45 => 1,
                age if age < 60 => 2,
                _ => 4,
            };
            let favourite = if rng.chance(0.7) {
                generation
            } else {
                1 + rng.below(4) as usize
            };
            let mut propensity = [0.0; 5];
            for (channel, p) in propensity.iter_mut().enumerate().skip(1) {
                *p = if channel == favourite {
                    0.45 + 0.35 * rng.unit()
                } else {
                    0.05 + 0.15 * rng.unit()
                };
            }
            user.behaviour.open_propensity = propensity;
        }
    }
}

impl SimUser {
    /// The channel (by `chukei.common.v1.Channel` value) this person is most
    /// likely to open among those their terminal takes: what an oracle sends.
    pub fn best_channel(&self) -> i32 {
        (1..5)
            .filter(|c| self.behaviour.supports[*c])
            .max_by(|a, b| {
                self.behaviour.open_propensity[*a].total_cmp(&self.behaviour.open_propensity[*b])
            })
            .unwrap_or(1) as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_spreads_over_carriers() {
        let carriers: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let fleet = Fleet::generate(42, 3_000, &carriers);
        assert_eq!(fleet, Fleet::generate(42, 3_000, &carriers));
        assert_ne!(fleet.users[0], Fleet::generate(43, 1, &carriers).users[0]);
        for carrier in &carriers {
            let primary = fleet
                .users
                .iter()
                .filter(|u| &u.carriers[0] == carrier)
                .count();
            assert!(primary > 800, "{carrier} has only {primary} primary users");
        }
        let two = fleet.users.iter().filter(|u| u.carriers.len() == 2).count();
        assert!((300..700).contains(&two), "{two} users with two carriers");
        assert!(
            fleet
                .users
                .iter()
                .all(|u| u.carriers.first() != u.carriers.get(1))
        );
    }
}
