//! Messages: acceptance (durable before the answer, idempotent by key) and
//! expansion — extract the recipients and identify their carriers in one
//! `INSERT … SELECT`, never a loop of queries.

use std::collections::HashMap;

use chukei_proto::window::Window;
use sqlx::{QueryBuilder, Row};

use super::auction::draw_on_bid;
use super::audit::append_audit;
use super::planning::{self, MessagePlan, Sql, execute_all};
use super::{
    AuditEntry, IdList, Param, ROWS_PER_STATEMENT, Store, WritePool, is_unique_violation, on_pool,
    stored_list,
};
use crate::auction::Terms;
use crate::error::{Error, Result};
use crate::learning::{self, ChannelBandit, Choice, EXPLORE_SHARE, OpenCounts, Segment};
use crate::policy::{
    AttentionConfig, Policy, PolicyKind, Priority, SendTime, WindowMode, channel_name,
};
use crate::registry::Gender;
use crate::targeting::{Channel, MessageState, NewMessage, Target};

/// A message as the enterprise sees it: its state and counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    pub message_id: String,
    pub state: MessageState,
    pub matched: Option<u64>,
    pub accepted_at: i64,
    /// The plan in words.
    pub plan: String,
    pub follow_up_id: Option<String>,
    /// Chose its people by consented attributes (a segment, or a follow-up of one).
    pub by_attributes: bool,
}

/// What `accept` stored, or found stored under the same key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub row: MessageRow,
    /// True when this call stored it; false when it replays an earlier call.
    pub created: bool,
}

/// A stored message's target, as expansion reads it back.
#[derive(Clone, Debug, Default)]
struct StoredTarget {
    is_segment: bool,
    service_id: Option<String>,
    gender: Option<String>,
    age: Option<(i64, i64)>,
    regions: Vec<String>,
    occupations: Vec<String>,
}

/// How far back, and how many, earlier segment messages a new segment is
/// compared with.
const COHORT_LOOKBACK_MS: i64 = 30 * 86_400_000;
const COHORT_RECENT_SEGMENTS: i64 = 20;

/// A stored segment's columns: service, gender, age bounds, regions, occupations.
type RecentSegment = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    String,
);

impl StoredTarget {
    fn of_segment(segment: &crate::targeting::Segment) -> Self {
        Self {
            is_segment: true,
            service_id: segment.service_id.clone(),
            gender: segment.gender.map(|g| Gender::as_str(g).to_owned()),
            age: segment
                .age
                .map(|(min, max)| (i64::from(min), i64::from(max))),
            regions: segment.regions.clone(),
            occupations: segment.occupations.clone(),
        }
    }

    fn from_columns(
        (service_id, gender, age_min, age_max, regions, occupations): RecentSegment,
    ) -> Self {
        let list = |joined: String| -> Vec<String> {
            joined
                .split('\n')
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Self {
            is_segment: true,
            service_id,
            gender,
            age: age_min.zip(age_max),
            regions: list(regions),
            occupations: list(occupations),
        }
    }
}

/// How many people `target` matches that `except` does not, counted up to
/// `cap` only.
fn differing(
    enterprise_id: &str,
    target: &StoredTarget,
    except: Option<&StoredTarget>,
    cap: u64,
) -> Sql {
    let mut sql =
        Sql::new("SELECT COUNT(*) FROM (SELECT user_id FROM (SELECT r.user_id AS user_id");
    campaign_source(&mut sql, enterprise_id, false, target);
    if let Some(except) = except {
        sql.push(" EXCEPT SELECT r.user_id");
        campaign_source(&mut sql, enterprise_id, false, except);
    }
    let cap = sql.bind(Param::Int(cap as i64));
    sql.push(&format!(") AS matched LIMIT {cap}) AS capped"));
    sql
}

/// Runs a `SELECT COUNT(…)` statement on `$on` (a pool, or `&mut *tx`).
/// Evaluates to `Result<u64, sqlx::Error>`.
macro_rules! count_on {
    ($on:expr, $sql:expr) => {{
        let sql: Sql = $sql;
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.text));
        for param in sql.params {
            query = match param {
                Param::Text(value) => query.bind(value),
                Param::Int(value) => query.bind(value),
                Param::Bool(value) => query.bind(value),
                Param::OptInt(value) => query.bind(value),
                Param::OptText(value) => query.bind(value),
            };
        }
        query.fetch_one($on).await.map(|count| count.max(0) as u64)
    }};
}

/// The minimum-cohort rule of [`Store::check_cohort`], read through `$on`
/// (a pool for a quote; the accepting transaction for a send, so it sees
/// every segment message accepted before it). Evaluates to `Result<()>`.
macro_rules! check_cohort {
    ($on:expr, $enterprise_id:expr, $segment:expr, $min_cohort:expr, $now:expr) => {
        async {
            let (enterprise_id, segment, min_cohort, now): (&str, &crate::targeting::Segment, u64, i64) =
                ($enterprise_id, $segment, $min_cohort, $now);
            let target = StoredTarget::of_segment(segment);
            let everyone = StoredTarget {
                service_id: segment.service_id.clone(),
                ..StoredTarget::default()
            };
            let refuse = |reason: &str| {
                Err(Error::refused(
                    "target.segment",
                    format!("{reason} (minimum cohort {min_cohort}); widen or change the segment"),
                ))
            };
            if count_on!($on, differing(enterprise_id, &target, None, min_cohort))? < min_cohort {
                return refuse("matches too few people");
            }
            if count_on!($on, differing(enterprise_id, &everyone, Some(&target), min_cohort))? < min_cohort {
                return refuse("leaves too few people out");
            }
            let recent: Vec<RecentSegment> = sqlx::query_as(
                "SELECT target_service_id, seg_gender, seg_age_min, seg_age_max, seg_regions, seg_occupations
                 FROM messages WHERE enterprise_id = $1 AND target_kind = 'segment' AND accepted_at >= $2
                 ORDER BY accepted_at DESC LIMIT $3",
            )
            .bind(enterprise_id)
            .bind(now - COHORT_LOOKBACK_MS)
            .bind(COHORT_RECENT_SEGMENTS)
            .fetch_all($on)
            .await?;
            for earlier in recent {
                let earlier = StoredTarget::from_columns(earlier);
                let difference = count_on!($on, differing(enterprise_id, &target, Some(&earlier), min_cohort))?
                    + count_on!($on, differing(enterprise_id, &earlier, Some(&target), min_cohort))?;
                if difference > 0 && difference < min_cohort {
                    return refuse("differs from an earlier segment message by too few people");
                }
            }
            Ok::<(), Error>(())
        }
        .await
    };
}

/// Every channel, in the order `best` considers them when none are named.
const ALL_CHANNELS: [Channel; 4] = [Channel::Rcs, Channel::Sms, Channel::Email, Channel::Sns];

impl Store {
    /// Stores a message durably (one transaction, committed before the
    /// caller answers). A refs target is validated and expanded in the same
    /// transaction; other targets are left `Accepted` for the expander. No
    /// minimum cohort (see [`Store::accept_on_terms`]).
    pub async fn accept_message(
        &self,
        enterprise_id: &str,
        message_id: &str,
        message: &NewMessage,
        now: i64,
        expires_at: i64,
        attention: &AttentionConfig,
    ) -> Result<StoredMessage> {
        let terms = Terms::default();
        self.accept_on_terms(
            enterprise_id,
            message_id,
            message,
            now,
            expires_at,
            attention,
            &terms,
            0,
        )
        .await
    }

    /// [`Store::accept_message`] on the auction's `terms`: a message sent
    /// with a winning bid is expanded at once (whatever its target) and
    /// draws its recipients from the bid's capacity in the same transaction,
    /// or is refused with nothing stored; the message keeps the price table
    /// in force, which its charges use. A segment is held to `min_cohort`
    /// ([`Store::check_cohort`]) and its attribute use audited, both in the
    /// accepting transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn accept_on_terms(
        &self,
        enterprise_id: &str,
        message_id: &str,
        message: &NewMessage,
        now: i64,
        expires_at: i64,
        attention: &AttentionConfig,
        terms: &Terms,
        min_cohort: u64,
    ) -> Result<StoredMessage> {
        let fingerprint = message.fingerprint();
        let expires_at = terms.expires_by.map_or(expires_at, |by| by.min(expires_at));
        if let Some(found) = self.replay(enterprise_id, message, &fingerprint).await? {
            return Ok(found);
        }
        let (service_id, segment) = match &message.target {
            Target::Service(service) => (Some(service.as_str()), None),
            Target::Segment(segment) => (segment.service_id.as_deref(), Some(segment)),
            _ => (None, None),
        };
        // `best`: the hub's best channel goes first in the plan (and stays the
        // unsupported fallback order); each person's own channel is drawn by
        // the bandit when their attempts are planned.
        let mut policy = message.policy.clone();
        if let (Some(channel), true) = (terms.channel, policy.channels.is_empty()) {
            policy.channels = vec![channel];
        }
        let mut estimate = terms.note.clone();
        let mut bandit = None;
        if policy.kind == PolicyKind::Best {
            let candidates = if policy.channels.is_empty() {
                ALL_CHANNELS.to_vec()
            } else {
                policy.channels.clone()
            };
            let rates = self.channel_rates(now).await?;
            let (best, words) = planning::choose_best(&candidates, &rates);
            policy.channels = std::iter::once(best)
                .chain(candidates.into_iter().filter(|c| *c != best))
                .collect();
            estimate = Some(format!(
                "each person's channel by Thompson sampling on their own opens, at most {:.0}% explored; hub prior: {words}",
                100.0 * EXPLORE_SHARE
            ));
            bandit = Some(
                self.bandit(enterprise_id, &policy.channels, &rates, now)
                    .await?,
            );
        }
        let plan = MessagePlan {
            enterprise_id: enterprise_id.to_owned(),
            target_kind: message.target.kind().to_owned(),
            policy,
            all_carriers: message.all_carriers,
            window: terms
                .window
                .clone()
                .or_else(|| message.timing.window.clone()),
            window_mode: if terms.window.is_some() {
                WindowMode::HeldAtRelay
            } else {
                message.timing.mode
            },
            priority: message.priority,
            accepted_at: now,
            expires_at,
            follow_up_id: message
                .follow_up
                .as_ref()
                .map(|_| format!("{message_id}-followup")),
            follow_up_delay_ms: message.follow_up.as_ref().map_or(0, |f| f.delay_ms),
            send_time: message.timing.send_time,
        };
        let description = planning::describe(&plan, estimate.as_deref());
        // Concurrent calls share one transaction and one commit (`group.rs`).
        let result: Result<StoredMessage> = on_pool!(self, pool, groups => {
            let mut tx = groups.accepts.join(pool).await?;
            if let Some(segment) = segment {
                // Segment sends one at a time, hub-wide, until this one
                // commits: the cohort check below then sees every segment
                // message accepted before it, so two concurrent sends cannot
                // each pass against the other and together single a person
                // out. The lock is the audit chain's head, which this
                // transaction extends anyway (the attribute use, below).
                sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
                    .execute(&mut *tx)
                    .await?;
                check_cohort!(&mut *tx, enterprise_id, segment, min_cohort, now)?;
            }
            if let Some(service_id) = service_id {
                let owned: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(1 AS BIGINT) FROM services WHERE id = $1 AND enterprise_id = $2",
                )
                .bind(service_id)
                .bind(enterprise_id)
                .fetch_optional(&mut *tx)
                .await?;
                if owned.is_none() {
                    let field = if segment.is_some() { "target.segment.service_id" } else { "target.service_id" };
                    return Err(Error::not_found(field, "no such service of this enterprise"));
                }
            }
            let recipients = match &message.target {
                Target::Refs(refs) => {
                    let mut users = HashMap::with_capacity(refs.len());
                    for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                        let mut query = QueryBuilder::new(
                            "SELECT user_ref, user_id FROM registrations WHERE enterprise_id = ",
                        );
                        query.push_bind(enterprise_id).push(" AND user_ref IN (");
                        let mut list = query.separated(", ");
                        for user_ref in chunk {
                            list.push_bind(user_ref);
                        }
                        query.push(")");
                        let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *tx).await?;
                        users.extend(rows);
                    }
                    if let Some(index) = refs.iter().position(|r| !users.contains_key(r)) {
                        return Err(Error::not_found(
                            format!("target.refs[{index}]"),
                            "not registered with this enterprise",
                        ));
                    }
                    Some(users.into_values().collect::<Vec<_>>())
                }
                _ => None,
            };
            let stored_target = segment.map(|s| StoredTarget {
                service_id: None,
                ..StoredTarget::of_segment(s)
            });
            let row = insert_message(message_id, &fingerprint, message, &plan, &description, service_id, stored_target.clone());
            let inserted = execute_all!(tx, message_id, [row]);
            match inserted {
                Ok(_) => {}
                Err(error) if is_unique_violation(&error) => {
                    // A concurrent call with the same key won; answer as it did
                    // once its commit (perhaps this very group's) is done.
                    tx.roll_back().await?;
                    return self
                        .replay(enterprise_id, message, &fingerprint)
                        .await?
                        .ok_or_else(|| Error::Internal(anyhow::anyhow!("idempotent message vanished")));
                }
                Err(error) => return Err(error.into()),
            }
            sqlx::query(
                "UPDATE messages SET price_table = (SELECT MAX(id) FROM price_tables), bid_id = $2 WHERE id = $1",
            )
            .bind(message_id)
            .bind(terms.bid_id.as_deref())
            .execute(&mut *tx)
            .await?;
            if let (Some(follow_up), Some(follow_up_id)) = (&message.follow_up, &plan.follow_up_id) {
                let child = insert_follow_up(follow_up_id, message_id, follow_up, &plan, now);
                execute_all!(tx, message_id, [child])?;
            }
            let mut matched = None;
            if let Some(users) = recipients {
                let timing = plan.timing(now).unwrap_or((now, now));
                let choices = planning::first_channels(&plan.policy, None);
                for chunk in users.chunks(ROWS_PER_STATEMENT) {
                    let statements = planning::insert_attempts(message_id, &choices, timing, now, "", |sql| {
                        let all = sql.bind(Param::Bool(plan.all_carriers));
                        let mut list = Vec::with_capacity(chunk.len());
                        for user in chunk {
                            list.push(sql.bind(Param::Text(user.clone())));
                        }
                        sql.push(&format!(
                            " FROM contracts c WHERE (c.is_primary OR {all}) AND c.user_id IN ({})",
                            list.join(", ")
                        ));
                    });
                    execute_all!(tx, message_id, statements)?;
                }
                if let Some(bandit) = &bandit {
                    choose_channels_per_person!(tx, self, message_id, bandit);
                }
                time_per_person!(tx, self, message_id, plan, now);
                let quiet = planning::open_quiet_periods(message_id, timing.0, now, attention);
                execute_all!(tx, message_id, quiet)?;
                // A targeted message goes before campaigns' backlogs.
                sqlx::query("UPDATE deliveries SET lane = 0 WHERE message_id = $1")
                    .bind(message_id)
                    .execute(&mut *tx)
                    .await?;
                let count = finish_expansion!(tx, message_id);
                matched = Some(count);
            } else if terms.bid_id.is_some() {
                let target = StoredTarget { service_id: service_id.map(str::to_owned), ..stored_target.clone().unwrap_or_default() };
                let statements = campaign_statements(message_id, &plan, &target, now, attention);
                execute_all!(tx, message_id, statements)?;
                time_per_person!(tx, self, message_id, plan, now);
                matched = Some(finish_expansion!(tx, message_id));
            }
            if let (Some(bid_id), Some(recipients)) = (&terms.bid_id, matched) {
                draw_on_bid!(tx, enterprise_id, bid_id, recipients as i64);
            }
            if let Some(segment) = segment {
                // The attribute use is on record in the commit that accepts
                // the message: never one without the other.
                let entry = AuditEntry::new(
                    format!("enterprise:{enterprise_id}"),
                    "attributes.used",
                    message_id,
                    format!("purpose: targeting; fields: {}", segment.fields()),
                );
                append_audit!(tx, now, [&entry]);
            }
            tx.commit().await?;
            Ok(StoredMessage {
                row: MessageRow {
                    message_id: message_id.to_owned(),
                    state: if matched.is_some() { MessageState::Expanded } else { MessageState::Accepted },
                    matched,
                    accepted_at: now,
                    plan: description,
                    follow_up_id: plan.follow_up_id.clone(),
                    by_attributes: plan.target_kind == "segment",
                },
                created: true,
            })
        });
        result
    }

    /// How many people `target` of `enterprise_id` matches now (a person
    /// with several carriers is one), as `SendMessage` would extract them;
    /// unregistered refs and foreign services are refused the same way.
    pub async fn count_recipients(&self, enterprise_id: &str, target: &Target) -> Result<u64> {
        let stored = match target {
            Target::Refs(refs) => {
                let mut found = std::collections::HashSet::with_capacity(refs.len());
                for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                    let rows: Vec<String> = on_pool!(self, pool => {
                        let mut query = QueryBuilder::new(
                            "SELECT user_ref FROM registrations WHERE enterprise_id = ",
                        );
                        query.push_bind(enterprise_id).push(" AND user_ref IN (");
                        let mut list = query.separated(", ");
                        for user_ref in chunk {
                            list.push_bind(user_ref);
                        }
                        query.push(")");
                        query.build_query_scalar().fetch_all(pool).await
                    })?;
                    found.extend(rows);
                }
                if let Some(index) = refs.iter().position(|r| !found.contains(r)) {
                    return Err(Error::not_found(
                        format!("target.refs[{index}]"),
                        "not registered with this enterprise",
                    ));
                }
                return Ok(refs.len() as u64);
            }
            Target::AllRegistered => StoredTarget::default(),
            Target::Service(service) => StoredTarget {
                service_id: Some(service.clone()),
                ..StoredTarget::default()
            },
            Target::Segment(segment) => StoredTarget::of_segment(segment),
        };
        if let Some(service_id) = &stored.service_id {
            let owned: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM services WHERE id = $1 AND enterprise_id = $2",
            )
            .bind(service_id)
            .bind(enterprise_id)
            .fetch_optional(pool)
            .await)?;
            if owned.is_none() {
                let field = if stored.is_segment {
                    "target.segment.service_id"
                } else {
                    "target.service_id"
                };
                return Err(Error::not_found(
                    field,
                    "no such service of this enterprise",
                ));
            }
        }
        let mut sql = Sql::new("SELECT COUNT(DISTINCT c.user_id)");
        campaign_source(&mut sql, enterprise_id, false, &stored);
        self.count(sql).await
    }

    /// Refuses an attribute segment that could single people out, without
    /// saying how many it matches: it must match at least `min_cohort`
    /// people, leave at least `min_cohort` of its audience (the enterprise's
    /// registered people, or the service's) outside it, and differ from each
    /// of the enterprise's segment messages of the last 30 days by none or
    /// at least `min_cohort` people — so no two answers differ by fewer.
    /// For a quote; a send checks inside its accepting transaction
    /// ([`Store::accept_on_terms`]), where no concurrent send can slip by.
    pub async fn check_cohort(
        &self,
        enterprise_id: &str,
        segment: &crate::targeting::Segment,
        min_cohort: u64,
        now: i64,
    ) -> Result<()> {
        on_pool!(self, pool => check_cohort!(pool, enterprise_id, segment, min_cohort, now))
    }

    /// Runs a `SELECT COUNT(…)` statement.
    async fn count(&self, sql: Sql) -> Result<u64> {
        Ok(on_pool!(self, pool => count_on!(pool, sql))?)
    }

    /// The stored answer for an idempotency key, or an error when the key was
    /// used for a different message.
    async fn replay(
        &self,
        enterprise_id: &str,
        message: &NewMessage,
        fingerprint: &str,
    ) -> Result<Option<StoredMessage>> {
        let found: Option<(String, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, fingerprint FROM messages WHERE enterprise_id = $1 AND idempotency_key = $2",
        )
        .bind(enterprise_id)
        .bind(&message.idempotency_key)
        .fetch_optional(pool)
        .await)?;
        match found {
            None => Ok(None),
            Some((_, stored)) if stored != fingerprint => Err(Error::already_exists(
                "idempotency_key",
                "already used for a different message",
            )),
            Some((message_id, _)) => {
                Ok(self
                    .message(enterprise_id, &message_id)
                    .await?
                    .map(|row| StoredMessage {
                        row,
                        created: false,
                    }))
            }
        }
    }

    /// One of the enterprise's messages; another enterprise's is "not found".
    pub async fn message(
        &self,
        enterprise_id: &str,
        message_id: &str,
    ) -> Result<Option<MessageRow>> {
        type Found = (i64, Option<i64>, i64, String, Option<String>, bool);
        let found: Option<Found> = on_pool!(self, pool => sqlx::query_as(
            "SELECT state, matched, accepted_at, plan, follow_up_id, by_attributes FROM messages WHERE id = $1 AND enterprise_id = $2",
        )
        .bind(message_id)
        .bind(enterprise_id)
        .fetch_optional(pool)
        .await)?;
        Ok(found.map(
            |(state, matched, accepted_at, plan, follow_up_id, by_attributes)| MessageRow {
                message_id: message_id.to_owned(),
                state: MessageState::from_number(state),
                matched: matched.map(|m| m as u64),
                accepted_at,
                plan,
                follow_up_id,
                by_attributes,
            },
        ))
    }

    /// Messages accepted but not yet expanded, oldest first, with the trace
    /// each was accepted in.
    pub async fn messages_to_expand(&self, limit: u32) -> Result<Vec<(String, String)>> {
        let ids = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, trace_parent FROM messages WHERE state = 1 ORDER BY accepted_at, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await)?;
        Ok(ids)
    }

    /// How a message is to be delivered, as stored; `None` for no such message.
    pub async fn message_plan(&self, message_id: &str) -> Result<Option<MessagePlan>> {
        Ok(self.load(message_id).await?.map(|(plan, ..)| plan))
    }

    async fn load(&self, message_id: &str) -> Result<Option<(MessagePlan, StoredTarget, i64)>> {
        let loaded: Option<Result<(MessagePlan, StoredTarget, i64)>> = on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT enterprise_id, target_kind, target_service_id, seg_gender, seg_age_min, seg_age_max,
                        seg_regions, seg_occupations, all_carriers, state, policy, channels, timeout_ms,
                        max_resends, resend_until_delivered, delivery_window, window_at_carrier, priority,
                        accepted_at, expires_at, follow_up_id, follow_up_delay_ms, send_time
                 FROM messages WHERE id = $1",
            )
            .bind(message_id)
            .fetch_optional(pool)
            .await?;
            row.map(|row| -> Result<(MessagePlan, StoredTarget, i64)> {
                let age_min: Option<i64> = row.try_get(4)?;
                let age_max: Option<i64> = row.try_get(5)?;
                let target = StoredTarget {
                    is_segment: row.try_get::<String, _>(1)? == "segment",
                    service_id: row.try_get(2)?,
                    gender: row.try_get(3)?,
                    age: age_min.zip(age_max),
                    regions: stored_list(row.try_get(6)?),
                    occupations: stored_list(row.try_get(7)?),
                };
                let policy_name: String = row.try_get(10)?;
                let channels: String = row.try_get(11)?;
                let window: Option<String> = row.try_get(15)?;
                let plan = MessagePlan {
                    enterprise_id: row.try_get(0)?,
                    target_kind: row.try_get(1)?,
                    policy: Policy {
                        kind: PolicyKind::parse(&policy_name).unwrap_or(PolicyKind::Fixed),
                        channels: channels
                            .split(',')
                            .filter_map(|n| n.parse().ok())
                            .filter_map(Channel::from_number)
                            .collect(),
                        timeout_ms: row.try_get(12)?,
                        max_resends: row.try_get::<i64, _>(13)? as u32,
                        resend_until_delivered: row.try_get(14)?,
                    },
                    all_carriers: row.try_get(8)?,
                    window: window
                        .map(|w| Window::decode(&w))
                        .transpose()
                        .map_err(|e| Error::Internal(anyhow::anyhow!(e)))?,
                    window_mode: if row.try_get(16)? { WindowMode::AtCarrier } else { WindowMode::HeldAtRelay },
                    priority: Priority::from_number(row.try_get(17)?),
                    accepted_at: row.try_get(18)?,
                    expires_at: row.try_get(19)?,
                    follow_up_id: row.try_get(20)?,
                    follow_up_delay_ms: row.try_get(21)?,
                    send_time: row
                        .try_get::<Option<String>, _>(22)?
                        .and_then(|stored| SendTime::decode(&stored)),
                };
                Ok((plan, target, row.try_get(9)?))
            })
        });
        loaded.transpose()
    }

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
        if state != 1 {
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
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let state: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(claim))
                .bind(message_id)
                .fetch_optional(&mut *tx)
                .await?;
            if state != Some(1) {
                return Ok(0);
            }
            execute_all!(tx, message_id, statements)?;
            if let Some(bandit) = &bandit {
                choose_channels_per_person!(tx, self, message_id, bandit);
            }
            time_per_person!(tx, self, message_id, plan, now);
            let matched = finish_expansion!(tx, message_id);
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
    async fn bandit(
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

/// How far back the hub's channel rates reach for `best`.
const LEARNING_WINDOW_MS: i64 = 30 * 24 * 3_600_000;

/// For `best`: draws each recipient's channel with `$bandit` from their own
/// history, and rewrites the first attempts of `$message_id` in `$tx` (of
/// store `$store`) with it and the reason.
macro_rules! choose_channels_per_person {
    ($tx:expr, $store:expr, $message_id:expr, $bandit:expr) => {{
        let people: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, user_id FROM deliveries WHERE message_id = $1 AND attempt = 0 AND state IN (0, 6)",
        )
        .bind($message_id)
        .fetch_all(&mut *$tx)
        .await?;
        let history: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT c.user_id, c.channel, CAST(SUM(c.delivered) AS BIGINT), CAST(SUM(c.opened) AS BIGINT)
             FROM person_channels c
             WHERE c.channel > 0 AND c.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)
             GROUP BY c.user_id, c.channel",
        )
        .bind($message_id)
        .fetch_all(&mut *$tx)
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
        .bind($message_id)
        .fetch_all(&mut *$tx)
        .await?
        .into_iter()
        .map(|(user_id, gender, age)| (user_id, (gender, age)))
        .collect();
        let choices = $bandit.assign(
            $message_id,
            people.iter().map(|(_, user)| (user.as_str(), segments.get(user))),
            &history,
        );
        let mut groups: HashMap<Choice, Vec<i64>> = HashMap::new();
        for (id, user) in &people {
            groups.entry(choices[user.as_str()]).or_default().push(*id);
        }
        let update = format!(
            "UPDATE deliveries SET channel = $1, reason = $2 WHERE {}",
            $store.in_id_list("id", 3)
        );
        for (choice, ids) in groups {
            sqlx::query(sqlx::AssertSqlSafe(update.clone()))
                .bind(Channel::number(Some(choice.channel)))
                .bind(choice_reason(choice, $bandit.explore_share()))
                .bind(IdList(&ids))
                .execute(&mut *$tx)
                .await?;
        }
    }};
}
use choose_channels_per_person;

/// For a per-person send time: each recipient's first attempts of
/// `$message_id` (planned by `$plan` at `$now`) wait for the hour chosen for
/// them, or are skipped with the reason, in `$tx` of store `$store`. Attempts
/// already held (quiet period) or skipped (fatigue) keep that.
macro_rules! time_per_person {
    ($tx:expr, $store:expr, $message_id:expr, $plan:expr, $now:expr) => {{
        if let Some(send_time) = $plan.send_time {
            let now: i64 = $now;
            let within = send_time.within_ms().min($plan.expires_at - now);
            let people: Vec<(i64, String)> = sqlx::query_as(
                "SELECT id, user_id FROM deliveries WHERE message_id = $1 AND attempt = 0 AND state = 0",
            )
            .bind($message_id)
            .fetch_all(&mut *$tx)
            .await?;
            let mut decided: HashMap<String, Result<(i64, String), String>> = HashMap::new();
            match send_time {
                SendTime::BestHour { .. } => {
                    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                        "SELECT h.user_id, h.hour, h.opened FROM person_hours h
                         WHERE h.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)",
                    )
                    .bind($message_id)
                    .fetch_all(&mut *$tx)
                    .await?;
                    let mut opens: HashMap<String, [u64; 24]> = HashMap::new();
                    for (user_id, hour, opened) in rows {
                        opens.entry(user_id).or_insert([0; 24])[hour.rem_euclid(24) as usize] += opened.max(0) as u64;
                    }
                    for (_, user_id) in &people {
                        let seen = opens.get(user_id).copied().unwrap_or([0; 24]);
                        decided.insert(user_id.clone(), Ok(learning::best_hour(&seen, now, within)));
                    }
                }
                SendTime::PlaceHour { min_rate_permille, .. } => {
                    let places: HashMap<String, String> = sqlx::query_as(
                        "SELECT p.user_id, p.place FROM person_places p
                         WHERE p.user_id IN (SELECT user_id FROM deliveries WHERE message_id = $1)",
                    )
                    .bind($message_id)
                    .fetch_all(&mut *$tx)
                    .await?
                    .into_iter()
                    .collect();
                    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
                        "SELECT place, send_hour % 24, CAST(SUM(delivered) AS BIGINT), CAST(SUM(opened) AS BIGINT)
                         FROM stats_cells WHERE enterprise_id = $1 AND place <> '' AND send_hour >= $2
                         GROUP BY place, send_hour % 24",
                    )
                    .bind(&$plan.enterprise_id)
                    .bind((now - LEARNING_WINDOW_MS).div_euclid(3_600_000))
                    .fetch_all(&mut *$tx)
                    .await?;
                    let rates: HashMap<(String, usize), OpenCounts> = rows
                        .into_iter()
                        .map(|(place, hour, delivered, opened)| {
                            ((place, hour.rem_euclid(24) as usize), OpenCounts::counted(delivered, opened))
                        })
                        .collect();
                    for (_, user_id) in &people {
                        let place = places.get(user_id).map(String::as_str);
                        decided.insert(
                            user_id.clone(),
                            learning::place_hour(place, &rates, min_rate_permille, now, within),
                        );
                    }
                }
            }
            let mut groups: HashMap<&Result<(i64, String), String>, Vec<i64>> = HashMap::new();
            for (id, user_id) in &people {
                groups.entry(&decided[user_id]).or_default().push(*id);
            }
            let schedule = format!(
                "UPDATE deliveries SET state = $1, not_before = $2, reason = $3 WHERE {}",
                $store.in_id_list("id", 4)
            );
            let skip = format!(
                "UPDATE deliveries SET state = 5, note = $1 WHERE {}",
                $store.in_id_list("id", 2)
            );
            let mut skipped = false;
            for (decision, ids) in groups {
                match decision {
                    Ok((at, reason)) => {
                        sqlx::query(sqlx::AssertSqlSafe(schedule.clone()))
                            .bind(if *at > now { planning::WAITING } else { planning::PENDING })
                            .bind(*at)
                            .bind(reason)
                            .bind(IdList(&ids))
                            .execute(&mut *$tx)
                            .await?;
                    }
                    Err(reason) => {
                        skipped = true;
                        sqlx::query(sqlx::AssertSqlSafe(skip.clone()))
                            .bind(reason)
                            .bind(IdList(&ids))
                            .execute(&mut *$tx)
                            .await?;
                    }
                }
            }
            if skipped {
                execute_all!($tx, $message_id, [planning::record_skips($message_id, now)])?;
            }
        }
    }};
}
use time_per_person;

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

/// Counts a message's matched users and marks it expanded, in `$tx`.
macro_rules! finish_expansion {
    ($tx:expr, $message_id:expr) => {{
        let matched: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT user_id) FROM deliveries WHERE message_id = $1",
        )
        .bind($message_id)
        .fetch_one(&mut *$tx)
        .await?;
        sqlx::query("UPDATE messages SET state = 2, matched = $2 WHERE id = $1 AND state = 1")
            .bind($message_id)
            .bind(matched)
            .execute(&mut *$tx)
            .await?;
        matched as u64
    }};
}
use finish_expansion;

/// The statements that plan a campaign's first attempts: one `INSERT …
/// SELECT` per first-attempt channel, the quiet-period deferrals and the
/// fatigue skips.
fn campaign_statements(
    message_id: &str,
    plan: &MessagePlan,
    target: &StoredTarget,
    now: i64,
    attention: &AttentionConfig,
) -> Vec<Sql> {
    let timing = plan.timing(now).unwrap_or((now, now));
    let choices = planning::first_channels(&plan.policy, None);
    let mut statements = planning::insert_attempts(message_id, &choices, timing, now, "", |sql| {
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

/// `FROM … WHERE …` selecting a campaign's recipients (contracts aliased `c`):
/// registered with the enterprise, in the service, matching the segment over
/// consented profiles.
fn campaign_source(sql: &mut Sql, enterprise_id: &str, all_carriers: bool, target: &StoredTarget) {
    let all = sql.bind(Param::Bool(all_carriers));
    sql.push(&format!(
        " FROM registrations r JOIN contracts c ON c.user_id = r.user_id AND (c.is_primary OR {all})"
    ));
    if let Some(service_id) = &target.service_id {
        let p = sql.bind(Param::Text(service_id.clone()));
        sql.push(&format!(
            " JOIN service_registrations s ON s.user_id = r.user_id AND s.enterprise_id = r.enterprise_id AND s.service_id = {p}"
        ));
    }
    let enterprise = sql.bind(Param::Text(enterprise_id.to_owned()));
    let mut filters = vec![format!("r.enterprise_id = {enterprise}")];
    if target.is_segment {
        sql.push(" JOIN profiles p ON p.enterprise_id = r.enterprise_id AND p.user_id = r.user_id");
        if let Some(gender) = &target.gender {
            let p = sql.bind(Param::Text(gender.clone()));
            filters.push(format!("p.gender = {p}"));
        }
        if let Some((min, max)) = target.age {
            let min = sql.bind(Param::Int(min));
            let max = sql.bind(Param::Int(max));
            filters.push(format!("p.age_min >= {min} AND p.age_max <= {max}"));
        }
        if !target.regions.is_empty() {
            let any: Vec<String> = target
                .regions
                .iter()
                .map(|region| {
                    let exact = sql.bind(Param::Text(region.clone()));
                    let below = sql.bind(Param::Text(format!("{region}/")));
                    let len = sql.bind(Param::Int(region.len() as i64 + 1));
                    format!("p.region = {exact} OR substr(p.region, 1, CAST({len} AS INTEGER)) = {below}")
                })
                .collect();
            filters.push(format!("({})", any.join(" OR ")));
        }
        if !target.occupations.is_empty() {
            let any: Vec<String> = target
                .occupations
                .iter()
                .map(|occupation| sql.bind(Param::Text(occupation.clone())))
                .collect();
            filters.push(format!("p.occupation IN ({})", any.join(", ")));
        }
    }
    sql.push(" WHERE ");
    sql.push(&filters.join(" AND "));
}

/// The `INSERT` of a new message row with its plan: state 1 (accepted),
/// recipients not yet matched.
fn insert_message(
    message_id: &str,
    fingerprint: &str,
    message: &NewMessage,
    plan: &MessagePlan,
    description: &str,
    service_id: Option<&str>,
    segment: Option<StoredTarget>,
) -> Sql {
    let segment = segment.unwrap_or_default();
    let text = |value: &str| Param::Text(value.to_owned());
    Sql::insert(
        "messages",
        vec![
            ("id", text(message_id)),
            ("enterprise_id", text(&plan.enterprise_id)),
            ("idempotency_key", text(&message.idempotency_key)),
            ("fingerprint", text(fingerprint)),
            ("target_kind", text(&plan.target_kind)),
            ("by_attributes", Param::Bool(plan.target_kind == "segment")),
            (
                "target_service_id",
                Param::OptText(service_id.map(str::to_owned)),
            ),
            ("seg_gender", Param::OptText(segment.gender)),
            (
                "seg_age_min",
                Param::OptInt(segment.age.map(|(min, _)| min)),
            ),
            (
                "seg_age_max",
                Param::OptInt(segment.age.map(|(_, max)| max)),
            ),
            ("seg_regions", Param::Text(segment.regions.join("\n"))),
            (
                "seg_occupations",
                Param::Text(segment.occupations.join("\n")),
            ),
            ("trace_parent", text(&message.trace_parent)),
            ("content_text", text(&message.content.text)),
            ("media_url", text(&message.content.media_url)),
            ("subject", text(&message.content.subject)),
            (
                "suggested_replies",
                Param::Text(message.content.suggested_replies.join("\n")),
            ),
            (
                "channel",
                Param::Int(Channel::number(plan.policy.channels.first().copied())),
            ),
            ("all_carriers", Param::Bool(plan.all_carriers)),
            ("state", Param::Int(MessageState::Accepted as i64)),
            ("matched", Param::OptInt(None)),
            ("accepted_at", Param::Int(plan.accepted_at)),
            ("reconciled_at", Param::Int(plan.accepted_at)),
            ("not_before", Param::Int(plan.accepted_at)),
            ("expires_at", Param::Int(plan.expires_at)),
            ("policy", text(plan.policy.kind.as_str())),
            ("channels", Param::Text(channel_list(&plan.policy.channels))),
            ("timeout_ms", Param::Int(plan.policy.timeout_ms)),
            (
                "max_resends",
                Param::Int(i64::from(plan.policy.max_resends)),
            ),
            (
                "resend_until_delivered",
                Param::Bool(plan.policy.resend_until_delivered),
            ),
            (
                "delivery_window",
                Param::OptText(plan.window.as_ref().map(Window::encode)),
            ),
            (
                "window_at_carrier",
                Param::Bool(plan.window_mode == WindowMode::AtCarrier),
            ),
            ("priority", Param::Int(plan.priority.number())),
            ("plan", text(description)),
            ("follow_up_id", Param::OptText(plan.follow_up_id.clone())),
            ("follow_up_delay_ms", Param::Int(plan.follow_up_delay_ms)),
            (
                "send_time",
                Param::OptText(plan.send_time.map(SendTime::encode)),
            ),
            (
                "single_attempt",
                Param::Bool(plan.policy.at_most_one_attempt()),
            ),
        ],
    )
}

/// The `INSERT` of the message that carries a follow-up: same enterprise,
/// expanded with no recipients until people open the original.
fn insert_follow_up(
    follow_up_id: &str,
    parent_id: &str,
    follow_up: &crate::policy::FollowUp,
    plan: &MessagePlan,
    now: i64,
) -> Sql {
    let channels: Vec<Channel> = follow_up.channel.into_iter().collect();
    let description = format!(
        "follow-up of {parent_id}: {} after each open, on {}",
        crate::policy::duration(follow_up.delay_ms),
        follow_up
            .channel
            .map_or("the channel opened", |c| crate::policy::channel_name(Some(
                c
            )))
    );
    let text = |value: &str| Param::Text(value.to_owned());
    Sql::insert(
        "messages",
        vec![
            ("id", text(follow_up_id)),
            ("enterprise_id", text(&plan.enterprise_id)),
            (
                "idempotency_key",
                Param::Text(format!("follow-up:{parent_id}")),
            ),
            ("fingerprint", text("")),
            ("target_kind", text("follow_up")),
            ("by_attributes", Param::Bool(plan.target_kind == "segment")),
            ("content_text", text(&follow_up.content.text)),
            ("media_url", text(&follow_up.content.media_url)),
            ("subject", text(&follow_up.content.subject)),
            (
                "suggested_replies",
                Param::Text(follow_up.content.suggested_replies.join("\n")),
            ),
            ("channel", Param::Int(Channel::number(follow_up.channel))),
            ("all_carriers", Param::Bool(plan.all_carriers)),
            ("state", Param::Int(MessageState::Expanded as i64)),
            ("matched", Param::Int(0)),
            ("accepted_at", Param::Int(now)),
            ("reconciled_at", Param::Int(now)),
            ("not_before", Param::Int(now)),
            (
                "expires_at",
                Param::Int(plan.expires_at.saturating_add(follow_up.delay_ms)),
            ),
            ("policy", text(PolicyKind::Fixed.as_str())),
            ("channels", Param::Text(channel_list(&channels))),
            ("priority", Param::Int(plan.priority.number())),
            ("plan", Param::Text(description)),
            ("single_attempt", Param::Bool(true)),
        ],
    )
}

fn channel_list(channels: &[Channel]) -> String {
    channels
        .iter()
        .map(|c| Channel::number(Some(*c)).to_string())
        .collect::<Vec<_>>()
        .join(",")
}
