//! What differs per person in a message's plan, decided after its
//! set-based statements planned everyone's first attempts: the channel
//! `best` draws for each person from their own history, and the hour each
//! is sent at (their best hour, or the place-and-hour rates). Run by each
//! step of a campaign's expansion and by a refs message's accept.

use std::collections::HashMap;

use const_format::formatcp;

use super::audience::UserRange;
use super::planning::{self, MessagePlan, PlanSteps};
use super::states::{PENDING, SKIPPED, UNSENT, WAITING};
use super::{IdList, Store, transaction_steps};
use crate::error::Result;
use crate::learning::{self, ChannelBandit, Choice, OpenCounts, Segment};
use crate::policy::{SendTime, channel_name};
use crate::targeting::Channel;

/// How far back the hub's channel rates reach for `best`, and the
/// place-and-hour rates for a send time.
pub(super) const LEARNING_WINDOW_MS: i64 = 30 * 24 * 3_600_000;

/// What was decided for each person's send time: when and why, or why not at all.
type SendTimes = HashMap<String, Result<(i64, String), String>>;

transaction_steps! {
    /// What a message's plan decides per person, inside its transaction.
    pub(super) trait PersonSteps {
        /// For `best`: draws each recipient among `users` a channel with
        /// `bandit` from their own history, and rewrites their first attempts
        /// of `message_id` with it and the reason.
        async fn choose_channels_per_person(
            &mut self,
            store: &Store,
            message_id: &str,
            bandit: &ChannelBandit,
            users: &UserRange,
        ) -> Result<()> {
            let mut people = sqlx::QueryBuilder::new("SELECT id, user_id FROM deliveries WHERE message_id = ");
            people.push_bind(message_id);
            users.push(&mut people, "user_id");
            people.push(formatcp!(" AND attempt = 0 AND state IN {UNSENT}"));
            let people: Vec<(i64, String)> = people.build_query_as().fetch_all(&mut *self).await?;
            let mut history = sqlx::QueryBuilder::new(
                "SELECT c.user_id, c.channel, CAST(SUM(c.delivered) AS BIGINT), CAST(SUM(c.opened) AS BIGINT)
                 FROM person_channels c
                 WHERE c.channel > 0 AND c.user_id IN (SELECT user_id FROM deliveries WHERE message_id = ",
            );
            history.push_bind(message_id);
            users.push(&mut history, "user_id");
            history.push(") GROUP BY c.user_id, c.channel");
            let history: Vec<(String, i64, i64, i64)> = history.build_query_as().fetch_all(&mut *self).await?;
            let history: Vec<(String, Channel, OpenCounts)> = history
                .into_iter()
                .filter_map(|(user_id, channel, delivered, opened)| {
                    Channel::from_number(channel).map(|c| {
                        (user_id, c, OpenCounts::counted(delivered, opened))
                    })
                })
                .collect();
            let mut segments = sqlx::QueryBuilder::new(format!(
                "SELECT p.user_id, COALESCE(p.gender, ''), {} FROM profiles p
                 WHERE p.enterprise_id = (SELECT enterprise_id FROM messages WHERE id = ",
                super::fold_log::AGE_BAND
            ));
            segments
                .push_bind(message_id)
                .push(") AND p.user_id IN (SELECT user_id FROM deliveries WHERE message_id = ")
                .push_bind(message_id);
            users.push(&mut segments, "user_id");
            segments.push(")");
            let segments: HashMap<String, Segment> = segments
            .build_query_as::<(String, String, i64)>()
            .fetch_all(&mut *self)
            .await?
            .into_iter()
            .map(|(user_id, gender, age)| (user_id, (gender, age)))
            .collect();
            let choices = bandit.assign(
                message_id,
                people.iter().map(|(_, user)| (user.as_str(), segments.get(user))),
                &history,
            );
            let mut groups: HashMap<Choice, Vec<i64>> = HashMap::new();
            for (id, user) in &people {
                groups.entry(choices[user.as_str()]).or_default().push(*id);
            }
            let update = format!(
                "UPDATE deliveries SET channel = $1, reason = $2 WHERE {}",
                store.in_id_list("id", 3)
            );
            for (choice, ids) in groups {
                sqlx::query(sqlx::AssertSqlSafe(update.clone()))
                    .bind(Channel::number(Some(choice.channel)))
                    .bind(choice_reason(choice, bandit.explore_share()))
                    .bind(IdList(&ids))
                    .execute(&mut *self)
                    .await?;
            }
            Ok(())
        }

        /// For a per-person send time: the first attempts of `message_id`
        /// (planned by `plan` at `now`) of each recipient among `users` wait
        /// for the hour chosen for them, or are skipped with the reason.
        /// Attempts already held (quiet period) or skipped (fatigue) keep that.
        async fn time_per_person(
            &mut self,
            store: &Store,
            message_id: &str,
            plan: &MessagePlan,
            now: i64,
            users: &UserRange,
        ) -> Result<()> {
            let Some(send_time) = plan.send_time else {
                return Ok(());
            };
            let within = send_time.within_ms().min(plan.expires_at - now);
            let mut people = sqlx::QueryBuilder::new("SELECT id, user_id FROM deliveries WHERE message_id = ");
            people.push_bind(message_id);
            users.push(&mut people, "user_id");
            people.push(formatcp!(" AND attempt = 0 AND state = {PENDING}"));
            let people: Vec<(i64, String)> = people.build_query_as().fetch_all(&mut *self).await?;
            let decided = match send_time {
                SendTime::BestHour { .. } => self.best_hours(message_id, users, &people, now, within).await?,
                SendTime::PlaceHour { min_rate_permille, .. } => {
                    self.place_hours(message_id, users, plan, &people, min_rate_permille, (now, within))
                        .await?
                }
            };
            self.schedule(store, message_id, users, &people, &decided, now).await
        }

        /// Each of `people`'s best hour by their own opens.
        async fn best_hours(
            &mut self,
            message_id: &str,
            users: &UserRange,
            people: &[(i64, String)],
            now: i64,
            within: i64,
        ) -> Result<SendTimes> {
            let mut decided = SendTimes::new();
            let mut rows = sqlx::QueryBuilder::new(
                "SELECT h.user_id, h.hour, h.opened FROM person_hours h
                 WHERE h.user_id IN (SELECT user_id FROM deliveries WHERE message_id = ",
            );
            rows.push_bind(message_id);
            users.push(&mut rows, "user_id");
            rows.push(")");
            let rows: Vec<(String, i64, i64)> = rows.build_query_as().fetch_all(&mut *self).await?;
            let mut opens: HashMap<String, [u64; 24]> = HashMap::new();
            for (user_id, hour, opened) in rows {
                opens.entry(user_id).or_insert([0; 24])[hour.rem_euclid(24) as usize] += opened.max(0) as u64;
            }
            for (_, user_id) in people {
                let seen = opens.get(user_id).copied().unwrap_or([0; 24]);
                decided.insert(user_id.clone(), Ok(learning::best_hour(&seen, now, within)));
            }
            Ok(decided)
        }

        /// Each of `people`'s hour by the open rates where their terminal was
        /// last seen, or a skip when no hour there reaches `min_rate_permille`.
        async fn place_hours(
            &mut self,
            message_id: &str,
            users: &UserRange,
            plan: &MessagePlan,
            people: &[(i64, String)],
            min_rate_permille: i64,
            now_within: (i64, i64),
        ) -> Result<SendTimes> {
            let (now, within) = now_within;
            let mut decided = SendTimes::new();
            let mut places = sqlx::QueryBuilder::new(
                "SELECT p.user_id, p.place FROM person_places p
                 WHERE p.user_id IN (SELECT user_id FROM deliveries WHERE message_id = ",
            );
            places.push_bind(message_id);
            users.push(&mut places, "user_id");
            places.push(")");
            let places: HashMap<String, String> = places
                .build_query_as::<(String, String)>()
                .fetch_all(&mut *self)
                .await?
                .into_iter()
                .collect();
            let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
                "SELECT place, send_hour % 24, CAST(SUM(delivered) AS BIGINT), CAST(SUM(opened) AS BIGINT)
                 FROM stats_cells WHERE enterprise_id = $1 AND place <> '' AND send_hour >= $2
                 GROUP BY place, send_hour % 24",
            )
            .bind(&plan.enterprise_id)
            .bind((now - LEARNING_WINDOW_MS).div_euclid(3_600_000))
            .fetch_all(&mut *self)
            .await?;
            let rates: HashMap<(String, usize), OpenCounts> = rows
                .into_iter()
                .map(|(place, hour, delivered, opened)| {
                    ((place, hour.rem_euclid(24) as usize), OpenCounts::counted(delivered, opened))
                })
                .collect();
            for (_, user_id) in people {
                let place = places.get(user_id).map(String::as_str);
                decided.insert(
                    user_id.clone(),
                    learning::place_hour(place, &rates, min_rate_permille, now, within),
                );
            }
            Ok(decided)
        }

        /// Writes the `decided` send times onto `people`'s attempts.
        async fn schedule(
            &mut self,
            store: &Store,
            message_id: &str,
            users: &UserRange,
            people: &[(i64, String)],
            decided: &SendTimes,
            now: i64,
        ) -> Result<()> {
            let mut groups: HashMap<&Result<(i64, String), String>, Vec<i64>> = HashMap::new();
            for (id, user_id) in people {
                groups.entry(&decided[user_id]).or_default().push(*id);
            }
            let schedule = format!(
                "UPDATE deliveries SET state = $1, not_before = $2, reason = $3 WHERE {}",
                store.in_id_list("id", 4)
            );
            let skip = format!(
                "UPDATE deliveries SET state = {SKIPPED}, note = $1 WHERE {}",
                store.in_id_list("id", 2)
            );
            let mut skipped = false;
            for (decision, ids) in groups {
                match decision {
                    Ok((at, reason)) => {
                        sqlx::query(sqlx::AssertSqlSafe(schedule.clone()))
                            .bind(if *at > now { WAITING } else { PENDING })
                            .bind(*at)
                            .bind(reason)
                            .bind(IdList(&ids))
                            .execute(&mut *self)
                            .await?;
                    }
                    Err(reason) => {
                        skipped = true;
                        sqlx::query(sqlx::AssertSqlSafe(skip.clone()))
                            .bind(reason)
                            .bind(IdList(&ids))
                            .execute(&mut *self)
                            .await?;
                    }
                }
            }
            if skipped {
                self.execute_all(message_id, [planning::record_skips(message_id, now, users)])
                    .await?;
            }
            Ok(())
        }

    }
}

/// Why a person got the channel `best` chose for them.
fn choice_reason(choice: Choice, explore_share: f64) -> String {
    let channel = channel_name(Some(choice.channel));
    if choice.explored {
        format!(
            "best for this person: trying {channel} to learn (at most {:.0}% of recipients are explored)",
            100.0 * explore_share
        )
    } else {
        format!(
            "best for this person: {channel} has their highest expected open rate (their history over the rates of people like them)"
        )
    }
}
