//! Expansion: a message's recipients become delivery attempts — the
//! campaign's set-based statements, then what differs per person (the
//! channel `best` draws for each, the hour each is sent at:
//! `per_person.rs`), then the matched count. A campaign is expanded in steps over its enterprise's
//! registrations in user id order ([`EXPANSION_CHUNK`] a step), each its own
//! short transaction that moves the message's cursor, so the writer is never
//! held for long and the first people are handed over while the rest are
//! planned.

use const_format::formatcp;

use super::audience::{StoredTarget, UserRange, campaign_source};
use super::per_person::{LEARNING_WINDOW_MS, PersonSteps};
use super::planning::{self, MessagePlan, PlanSteps, Sql};
use super::states::{ACCEPTED, EXPANDED};
use super::transfer::EVERYONE_HANDED_OVER;
use super::{CountSteps, Lane, Store, WritePool, on_pool, on_write, transaction_steps};
use crate::error::{Error, Result};
use crate::learning::{ChannelBandit, EXPLORE_SHARE, OpenCounts, Segment};
use crate::policy::{AttentionConfig, PolicyKind};
use crate::receipts::MessageEventKind;
use crate::targeting::Channel;

/// How many of an enterprise's registrations one step of a campaign's
/// expansion covers: a step of a broadcast holds the writer for a few
/// milliseconds (`docs/benchmarks.md`), so accepts and lease renewals wait
/// at most that long behind it.
pub const EXPANSION_CHUNK: u32 = 2_000;

/// Where a campaign's expansion stands after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expansion {
    /// More registrations to go; the people matched so far.
    Continues { matched: u64 },
    /// Expanded by this step; the people matched.
    Done { matched: u64 },
    /// Nothing to do here: another relay holds the message for a step right
    /// now, or it is no longer waiting to be expanded.
    NotHere,
}

/// Watches one campaign's expansion for the moments to look at
/// PostgreSQL's statistics of `deliveries`
/// ([`Store::keep_statistics_of_deliveries`]): from
/// [`StatisticsWatch::FROM`] people on, at each doubling, so they stay
/// within 2× of what the campaign has planned and a step costs no query.
#[derive(Debug)]
pub struct StatisticsWatch {
    next_at: u64,
}

impl Default for StatisticsWatch {
    fn default() -> Self {
        Self {
            next_at: Self::FROM,
        }
    }
}

impl StatisticsWatch {
    /// How many people a campaign plans before the statistics are first
    /// looked at.
    pub const FROM: u64 = 10_000;

    /// After `step` of the campaign: gathers the statistics if it is time
    /// and they lag. A failure is logged, not returned: the expansion goes
    /// on with the plans it has.
    pub async fn after(&mut self, store: &Store, step: Expansion) {
        let (Expansion::Continues { matched } | Expansion::Done { matched }) = step else {
            return;
        };
        if matched < self.next_at {
            return;
        }
        self.next_at = matched.saturating_mul(2);
        match store.keep_statistics_of_deliveries(matched).await {
            Ok(true) => tracing::debug!(matched, "gathered the statistics of deliveries"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "could not gather the statistics of deliveries"),
        }
    }
}

/// What every step of one campaign's expansion shares, read once: its
/// plan, its target and, for `best`, the bandit with its priors.
#[derive(Debug)]
pub struct Campaign {
    message_id: String,
    plan: MessagePlan,
    target: StoredTarget,
    bandit: Option<ChannelBandit>,
}

impl Store {
    /// Expands an accepted campaign to its end, step after step
    /// ([`Store::expand_step`]). Returns the number of users matched (0
    /// when it was not accepted).
    pub async fn expand_message(
        &self,
        message_id: &str,
        now: i64,
        attention: &AttentionConfig,
    ) -> Result<u64> {
        let Some(campaign) = self.campaign_to_expand(message_id, now).await? else {
            return Ok(0);
        };
        let mut statistics = StatisticsWatch::default();
        loop {
            let step = self
                .expand_step(&campaign, now, attention, EXPANSION_CHUNK)
                .await?;
            statistics.after(self, step).await;
            match step {
                Expansion::Done { matched } => return Ok(matched),
                Expansion::NotHere => return Ok(0),
                Expansion::Continues { .. } => {}
            }
        }
    }

    /// The campaign `message_id` as its expansion steps need it, or `None`
    /// when it is not waiting to be expanded.
    pub async fn campaign_to_expand(&self, message_id: &str, now: i64) -> Result<Option<Campaign>> {
        let Some((plan, target, state)) = self.load(message_id).await? else {
            return Err(Error::not_found("message_id", "no such message"));
        };
        if state != ACCEPTED {
            return Ok(None);
        }
        self.keep_statistics_of_registries().await;
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
        Ok(Some(Campaign {
            message_id: message_id.to_owned(),
            plan,
            target,
            bandit,
        }))
    }

    /// Plans the next `chunk` of an accepted campaign's registrations after
    /// its cursor, in one transaction: one `INSERT … SELECT` per
    /// first-attempt channel, the quiet-period deferrals, the fatigue skips,
    /// the people matched, and the cursor moved past them; the last step
    /// marks the message expanded with its matched count. A crash between
    /// steps leaves the message accepted with its cursor, and the expander
    /// goes on from there; running a step twice is harmless.
    pub async fn expand_step(
        &self,
        campaign: &Campaign,
        now: i64,
        attention: &AttentionConfig,
        chunk: u32,
    ) -> Result<Expansion> {
        let Campaign {
            message_id,
            plan,
            target,
            bandit,
        } = campaign;
        let message_id = message_id.as_str();
        // The message's row is claimed first (`FOR UPDATE SKIP LOCKED` on
        // PostgreSQL): a message another relay is expanding right now is
        // skipped — it stays accepted if that relay dies — and one expanded
        // meanwhile is left alone. Its cursor is read under the claim, so two
        // relays taking turns at its steps never plan one range twice.
        let claim = format!(
            "SELECT state, expand_cursor, expand_matched FROM messages WHERE id = $1{}",
            self.claim()
        );
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let claimed: Option<(i64, Option<String>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(claim))
                .bind(message_id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some((ACCEPTED, cursor, matched_before)) = claimed else {
                tx.rollback().await?;
                return Ok(Expansion::NotHere);
            };
            let (users, last) = tx.next_users(&plan.enterprise_id, cursor, chunk).await?;
            let statements = campaign_statements(message_id, plan, target, now, attention, &users);
            tx.execute_all(message_id, statements).await?;
            if let Some(bandit) = bandit {
                tx.choose_channels_per_person(self, message_id, bandit, &users).await?;
            }
            tx.time_per_person(self, message_id, plan, now, &users).await?;
            let step = if last {
                let matched = tx
                    .finish_expansion(message_id, &users, matched_before, now, self.webhooks_listening())
                    .await?;
                Expansion::Done { matched }
            } else {
                let matched = tx.finish_step(message_id, &users, matched_before).await?;
                Expansion::Continues { matched }
            };
            tx.commit().await?;
            Ok(step)
        })
    }

    /// Keeps PostgreSQL's statistics of `deliveries` in step with a campaign
    /// that fills it: when the attempts the campaign has `planned` so far are
    /// more than twice the rows the planner believes the whole table holds,
    /// they are gathered again (`ANALYZE deliveries`: a sample of ~30,000
    /// rows, a fraction of a second whatever the size). Returns whether it
    /// did; SQLite plans without them, so there it does nothing.
    ///
    /// Autovacuum would do the same, but a minute or more later, and a
    /// campaign writes a million rows in less: planned for an empty table,
    /// the hand-over's and the receipts' statements read every pending row
    /// of a carrier per batch, and the follow-through's timer scan read the
    /// whole table each poll (~1 s each at 1M; `docs/benchmarks.md`).
    pub async fn keep_statistics_of_deliveries(&self, planned: u64) -> Result<bool> {
        let Self::Postgres(pool, _) = self else {
            return Ok(false);
        };
        // -1 for a table never analyzed.
        let believed: f32 =
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'deliveries'::regclass")
                .fetch_one(pool)
                .await?;
        if f64::from(believed) * 2.0 >= planned as f64 {
            return Ok(false);
        }
        sqlx::query("ANALYZE deliveries").execute(pool).await?;
        Ok(true)
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

/// The statements that plan a campaign's first attempts for `users`: one
/// `INSERT … SELECT` per first-attempt channel, the quiet-period deferrals
/// and the fatigue skips.
pub(super) fn campaign_statements(
    message_id: &str,
    plan: &MessagePlan,
    target: &StoredTarget,
    now: i64,
    attention: &AttentionConfig,
    users: &UserRange,
) -> Vec<Sql> {
    let timing = plan.timing(now).unwrap_or((now, now));
    let choices = planning::first_channels(&plan.policy, None);
    let mut statements =
        planning::insert_attempts(message_id, &choices, timing, now, ("", Lane::Bulk), |sql| {
            campaign_source(sql, &plan.enterprise_id, plan.all_carriers, target, users);
        });
    if attention.quiet_period_ms > 0 {
        statements.push(planning::defer_for_quiet_periods(
            message_id, timing.0, users,
        ));
    }
    statements.extend(planning::apply_fatigue(
        message_id,
        plan.priority,
        now,
        attention,
        users,
    ));
    statements
}

transaction_steps! {
    /// A step's bookkeeping inside its transaction: which people it covers,
    /// how many it matched, the cursor and the end of the expansion.
    pub(super) trait ExpansionSteps {
        /// The registrations of `enterprise_id`'s next step after `cursor`
        /// (none yet: from the first), at most `chunk` of them, and whether
        /// it is the last step.
        async fn next_users(
            &mut self,
            enterprise_id: &str,
            cursor: Option<String>,
            chunk: u32,
        ) -> Result<(UserRange, bool)> {
            // The step's last user id; none: fewer than `chunk` remain.
            let mut last_of_step = sqlx::QueryBuilder::new("SELECT user_id FROM registrations WHERE enterprise_id = ");
            last_of_step.push_bind(enterprise_id);
            let from = UserRange { after: cursor, through: None };
            from.push(&mut last_of_step, "user_id");
            last_of_step
                .push(" ORDER BY user_id LIMIT 1 OFFSET ")
                .push_bind(i64::from(chunk.max(1)) - 1);
            let through: Option<String> = last_of_step.build_query_scalar().fetch_optional(&mut *self).await?;
            let Some(through) = through else {
                return Ok((from, true));
            };
            // In key order, so the plan is the key's range whatever the
            // bounds: PostgreSQL's generic plan of it without the order was a
            // scan from the table's start, which at 1M read ever more rows
            // before the first one past the step (226 ms at the last step).
            let more: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM registrations WHERE enterprise_id = $1 AND user_id > $2 ORDER BY user_id LIMIT 1",
            )
            .bind(enterprise_id)
            .bind(&through)
            .fetch_optional(&mut *self)
            .await?;
            Ok((UserRange { through: Some(through), ..from }, more.is_none()))
        }

        /// The people among `users` that `message_id` reaches (each once,
        /// however many carriers or channels).
        async fn people_in(&mut self, message_id: &str, users: &UserRange) -> Result<i64> {
            let mut count = sqlx::QueryBuilder::new(
                "SELECT COUNT(DISTINCT user_id) FROM deliveries WHERE message_id = ",
            );
            count.push_bind(message_id);
            users.push(&mut count, "user_id");
            Ok(count.build_query_scalar().fetch_one(&mut *self).await?)
        }

        /// A step of a campaign that is not its last: the people among
        /// `users` join the `matched_before` of the steps before, and the
        /// cursor moves past them. The people matched so far.
        async fn finish_step(&mut self, message_id: &str, users: &UserRange, matched_before: i64) -> Result<u64> {
            let matched = matched_before + self.people_in(message_id, users).await?;
            sqlx::query("UPDATE messages SET expand_cursor = $2, expand_matched = $3 WHERE id = $1")
                .bind(message_id)
                .bind(&users.through)
                .bind(matched)
                .execute(&mut *self)
                .await?;
            Ok(matched as u64)
        }

        /// The last planning of a message: counts its matched users (those
        /// among `users` and `matched_before` from its earlier steps) and
        /// marks it expanded — with its `message.expanded` event, and
        /// `message.handed_over` when its earlier steps' people are all
        /// handed over already, when some webhook endpoint is enabled.
        async fn finish_expansion(
            &mut self,
            message_id: &str,
            users: &UserRange,
            matched_before: i64,
            now: i64,
            webhooks_listening: bool,
        ) -> Result<u64> {
            // One statement (a targeted message's accept runs it too): the
            // count is taken where it is stored.
            let mut set = sqlx::QueryBuilder::new(formatcp!("UPDATE messages SET state = {EXPANDED}, matched = "));
            set.push_bind(matched_before)
                .push(" + (SELECT COUNT(DISTINCT d.user_id) FROM deliveries d WHERE d.message_id = ")
                .push_bind(message_id);
            users.push(&mut set, "d.user_id");
            set.push(") WHERE id = ")
                .push_bind(message_id)
                .push(formatcp!(" AND state = {ACCEPTED} RETURNING matched"));
            let set: Option<i64> = set.build_query_scalar().fetch_optional(&mut *self).await?;
            let matched = match set {
                Some(matched) => matched,
                // Expanded before (a second expander): nothing to set.
                None => sqlx::query_scalar("SELECT COALESCE(matched, 0) FROM messages WHERE id = $1")
                    .bind(message_id)
                    .fetch_one(&mut *self)
                    .await?,
            };
            if webhooks_listening {
                self.record_message_events(&[message_id], MessageEventKind::Expanded, "TRUE", now)
                    .await?;
                self.record_message_events(&[message_id], MessageEventKind::HandedOver, EVERYONE_HANDED_OVER, now)
                    .await?;
            }
            Ok(matched as u64)
        }
    }
}
