//! Expansion: a message's recipients become delivery attempts — the
//! campaign's set-based statements, then what differs per person (the
//! channel `best` draws for each, the hour each is sent at), then the
//! matched count.

use std::collections::HashMap;

use const_format::formatcp;

use super::audience::{StoredTarget, campaign_source};
use super::planning::{self, MessagePlan, PlanSteps, Sql};
use super::states::{ACCEPTED, EXPANDED, PENDING, SKIPPED, UNSENT, WAITING};
use super::{CountSteps, IdList, Lane, Store, WritePool, on_pool, on_write, transaction_steps};
use crate::error::{Error, Result};
use crate::learning::{self, ChannelBandit, Choice, EXPLORE_SHARE, OpenCounts, Segment};
use crate::policy::{AttentionConfig, PolicyKind, SendTime, channel_name};
use crate::receipts::MessageEventKind;
use crate::targeting::Channel;

/// How far back the hub's channel rates reach for `best`.
const LEARNING_WINDOW_MS: i64 = 30 * 24 * 3_600_000;

/// What was decided for each person's send time: when and why, or why not at all.
type SendTimes = HashMap<String, Result<(i64, String), String>>;

impl Store {
    /// Extracts the recipients of an accepted campaign and plans their
    /// deliveries, in one transaction: one `INSERT … SELECT` per first-attempt
    /// channel, the quiet-period deferrals, the fatigue skips, then the matched
    /// count. Running it twice is harmless. Returns the number of users matched.
    pub async fn expand_message(
        &self,
        message_id: &str,
        now: i64,
        attention: &AttentionConfig,
    ) -> Result<u64> {
        let Some((plan, target, state)) = self.load(message_id).await? else {
            return Err(Error::not_found("message_id", "no such message"));
        };
        if state != ACCEPTED {
            return Ok(0);
        }
        let statements = campaign_statements(message_id, &plan, &target, now, attention);
        let bandit = match plan.policy.kind {
            PolicyKind::Best => {
                let rates = self.channel_rates(now).await?;
                Some(
                    self.bandit(&plan.enterprise_id, &plan.policy.channels, &rates, now)
                        .await?,
                )
            }
            _ => None,
        };
        // The message's row is claimed first (`FOR UPDATE SKIP LOCKED` on
        // PostgreSQL): a message another relay is expanding right now is
        // skipped — it stays accepted if that relay dies — and one expanded
        // meanwhile is left alone.
        let claim = format!("SELECT state FROM messages WHERE id = $1{}", self.claim());
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let state: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(claim))
                .bind(message_id)
                .fetch_optional(&mut *tx)
                .await?;
            if state != Some(ACCEPTED) {
                tx.rollback().await?;
                return Ok(0);
            }
            tx.execute_all(message_id, statements).await?;
            if let Some(bandit) = &bandit {
                tx.choose_channels_per_person(self, message_id, bandit).await?;
            }
            tx.time_per_person(self, message_id, &plan, now).await?;
            let matched = tx.finish_expansion(message_id, now, self.webhooks_listening()).await?;
            tx.commit().await?;
            Ok(matched)
        })
    }

    /// Delivered and opened counts per channel over the hub's last
    /// [`LEARNING_WINDOW_MS`] of sends (from the rollups): the open rates `best`
    /// starts from.
    pub async fn channel_rates(&self, now: i64) -> Result<Vec<(Channel, OpenCounts)>> {
        let rows: Vec<(i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT channel, CAST(SUM(delivered) AS BIGINT), CAST(SUM(opened) AS BIGINT)
             FROM stats_cells WHERE channel > 0 AND send_hour >= $1 GROUP BY channel",
        )
        .bind((now - LEARNING_WINDOW_MS).div_euclid(3_600_000))
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .filter_map(|(channel, delivered, opened)| {
                Channel::from_number(channel).map(|c| (c, OpenCounts::counted(delivered, opened)))
            })
            .collect())
    }

    /// The bandit for a `best` message of `enterprise_id` over `candidates`,
    /// with priors from the `hub`'s rates and the enterprise's segments'.
    pub(super) async fn bandit(
        &self,
        enterprise_id: &str,
        candidates: &[Channel],
        hub: &[(Channel, OpenCounts)],
        now: i64,
    ) -> Result<ChannelBandit> {
        let rows: Vec<(String, i64, i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT gender, age_band, channel, CAST(SUM(delivered) AS BIGINT), CAST(SUM(opened) AS BIGINT)
             FROM stats_audience WHERE enterprise_id = $1 AND channel > 0 AND send_day >= $2
             GROUP BY gender, age_band, channel",
        )
        .bind(enterprise_id)
        .bind((now - LEARNING_WINDOW_MS).div_euclid(86_400_000))
        .fetch_all(pool)
        .await)?;
        let segments: Vec<(Segment, Channel, OpenCounts)> = rows
            .into_iter()
            .filter_map(|(gender, age, channel, delivered, opened)| {
                Channel::from_number(channel)
                    .map(|c| ((gender, age), c, OpenCounts::counted(delivered, opened)))
            })
            .collect();
        Ok(ChannelBandit::new(
            candidates,
            hub,
            &segments,
            EXPLORE_SHARE,
        ))
    }
}

/// The statements that plan a campaign's first attempts: one `INSERT …
/// SELECT` per first-attempt channel, the quiet-period deferrals and the
/// fatigue skips.
pub(super) fn campaign_statements(
    message_id: &str,
    plan: &MessagePlan,
    target: &StoredTarget,
    now: i64,
    attention: &AttentionConfig,
) -> Vec<Sql> {
    let timing = plan.timing(now).unwrap_or((now, now));
    let choices = planning::first_channels(&plan.policy, None);
    let mut statements =
        planning::insert_attempts(message_id, &choices, timing, now, ("", Lane::Bulk), |sql| {
            campaign_source(sql, &plan.enterprise_id, plan.all_carriers, target);
        });
    if attention.quiet_period_ms > 0 {
        statements.push(planning::defer_for_quiet_periods(message_id, timing.0));
    }
    statements.extend(planning::apply_fatigue(
        message_id,
        plan.priority,
        now,
        attention,
    ));
    statements
}

transaction_steps! {
    /// What expansion does per person, inside its transaction.
    pub(super) trait ExpansionSteps {
        /// For `best`: draws each recipient's channel with `bandit` from their
        /// own history, and rewrites the first attempts of `message_id` with
        /// it and the reason.
        async fn choose_channels_per_person(
            &mut self,
            store: &Store,
            message_id: &str,
            bandit: &ChannelBandit,
        ) -> Result<()> {
            let people: Vec<(i64, String)> = sqlx::query_as(
                formatcp!("SELECT id, user_id FROM deliveries WHERE message_id = $1 AND attempt = 0 AND state IN {UNSENT}"),
            )
            .bind(message_id)
            .fetch_all(&mut *self)
            .await?;
            let history: Vec<(String, i64, i64, i64)> = sqlx::query_as(
                "SELECT c.user_id, c.channel, CAST(SUM(c.delivered) AS BIGINT), CAST(SUM(c.opened) AS BIGINT)
                 FROM person_channels c
                 WHERE c.channel > 0 AND c.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)
                 GROUP BY c.user_id, c.channel",
            )
            .bind(message_id)
            .fetch_all(&mut *self)
            .await?;
            let history: Vec<(String, Channel, OpenCounts)> = history
                .into_iter()
                .filter_map(|(user_id, channel, delivered, opened)| {
                    Channel::from_number(channel).map(|c| {
                        (user_id, c, OpenCounts::counted(delivered, opened))
                    })
                })
                .collect();
            let segments: HashMap<String, Segment> = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT p.user_id, COALESCE(p.gender, ''), {} FROM profiles p
                 WHERE p.enterprise_id = (SELECT enterprise_id FROM messages WHERE id = $1)
                   AND p.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)",
                super::stats::AGE_BAND
            )))
            .bind(message_id)
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

        /// For a per-person send time: each recipient's first attempts of
        /// `message_id` (planned by `plan` at `now`) wait for the hour chosen
        /// for them, or are skipped with the reason. Attempts already held
        /// (quiet period) or skipped (fatigue) keep that.
        async fn time_per_person(
            &mut self,
            store: &Store,
            message_id: &str,
            plan: &MessagePlan,
            now: i64,
        ) -> Result<()> {
            let Some(send_time) = plan.send_time else {
                return Ok(());
            };
            let within = send_time.within_ms().min(plan.expires_at - now);
            let people: Vec<(i64, String)> = sqlx::query_as(
                formatcp!("SELECT id, user_id FROM deliveries WHERE message_id = $1 AND attempt = 0 AND state = {PENDING}"),
            )
            .bind(message_id)
            .fetch_all(&mut *self)
            .await?;
            let decided = match send_time {
                SendTime::BestHour { .. } => self.best_hours(message_id, &people, now, within).await?,
                SendTime::PlaceHour { min_rate_permille, .. } => {
                    self.place_hours(message_id, plan, &people, min_rate_permille, now, within)
                        .await?
                }
            };
            self.schedule(store, message_id, &people, &decided, now).await
        }

        /// Each of `people`'s best hour by their own opens.
        async fn best_hours(
            &mut self,
            message_id: &str,
            people: &[(i64, String)],
            now: i64,
            within: i64,
        ) -> Result<SendTimes> {
            let mut decided = SendTimes::new();
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT h.user_id, h.hour, h.opened FROM person_hours h
                 WHERE h.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)",
            )
            .bind(message_id)
            .fetch_all(&mut *self)
            .await?;
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
            plan: &MessagePlan,
            people: &[(i64, String)],
            min_rate_permille: i64,
            now: i64,
            within: i64,
        ) -> Result<SendTimes> {
            let mut decided = SendTimes::new();
            let places: HashMap<String, String> = sqlx::query_as(
                "SELECT p.user_id, p.place FROM person_places p
                 WHERE p.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)",
            )
            .bind(message_id)
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
                self.execute_all(message_id, [planning::record_skips(message_id, now)])
                    .await?;
            }
            Ok(())
        }

        /// Counts a message's matched users and marks it expanded (and its
        /// `message.expanded` event, when some webhook endpoint is enabled).
        async fn finish_expansion(&mut self, message_id: &str, now: i64, webhooks_listening: bool) -> Result<u64> {
            // One statement: the count is taken where it is stored.
            let set: Option<i64> = sqlx::query_scalar(formatcp!(
                "UPDATE messages SET state = {EXPANDED},
                        matched = (SELECT COUNT(DISTINCT d.user_id) FROM deliveries d WHERE d.message_id = $1)
                 WHERE id = $1 AND state = {ACCEPTED} RETURNING matched"
            ))
            .bind(message_id)
            .fetch_optional(&mut *self)
            .await?;
            let matched = match set {
                Some(matched) => matched,
                // Expanded before (a second expander): nothing to set.
                None => sqlx::query_scalar("SELECT COUNT(DISTINCT user_id) FROM deliveries WHERE message_id = $1")
                    .bind(message_id)
                    .fetch_one(&mut *self)
                    .await?,
            };
            if webhooks_listening {
                self.record_message_events(&[message_id], MessageEventKind::Expanded, "TRUE", now)
                    .await?;
            }
            Ok(matched as u64)
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
