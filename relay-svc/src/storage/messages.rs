//! Messages: acceptance — durable before the answer, idempotent by key,
//! a refs target (or a message sent with a winning bid) planned in the same
//! transaction — and reading stored messages back. Who a target matches is
//! `audience.rs`; turning recipients into attempts is `expanding.rs`.

use std::collections::HashSet;

use const_format::formatcp;
use sqlx::QueryBuilder;

use super::auction::BidSteps;
use super::audience::{AudienceSteps, StoredTarget, UserRange};
use super::audit::AuditSteps;
use super::expanding::{ExpansionSteps, campaign_statements};
use super::message_rows::{PlanRow, insert_follow_up, insert_message};
use super::per_person::PersonSteps;
use super::planning::{self, MessagePlan, PlanSteps};
use super::states::ACCEPTED;
use super::{
    AuditEntry, CountSteps, Lane, Param, ROWS_PER_STATEMENT, Store, is_unique_error, on_pool,
    transaction_steps,
};
use crate::auction::Terms;
use crate::error::{Error, Result};
use crate::learning::{ChannelBandit, EXPLORE_SHARE};
use crate::policy::{AttentionConfig, PolicyKind, WindowMode};
use crate::receipts::MessageEventKind;
use crate::targeting::{Channel, MessageState, NewMessage, Segment, Target};

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
    /// Its first attempts went to the dispatchers with its commit
    /// ([`Store::hand_due_now_to`]): nothing to wake for it.
    pub dispatched: bool,
}

/// Every channel, in the order `best` considers them when none are named.
const ALL_CHANNELS: [Channel; 4] = [Channel::Rcs, Channel::Sms, Channel::Email, Channel::Sns];

/// One message being accepted: the request and everything decided before
/// its transaction opens.
pub(super) struct Acceptance<'a> {
    enterprise_id: &'a str,
    pub(super) message_id: &'a str,
    pub(super) message: &'a NewMessage,
    pub(super) fingerprint: &'a str,
    pub(super) terms: &'a Terms,
    pub(super) plan: MessagePlan,
    /// The plan in words.
    pub(super) description: String,
    /// For `best`: what draws each person's channel.
    pub(super) bandit: Option<ChannelBandit>,
    pub(super) now: i64,
    pub(super) attention: &'a AttentionConfig,
    min_cohort: u64,
    /// Some enterprise has a webhook endpoint: the message's own events are written.
    pub(super) webhooks_listening: bool,
}

impl Acceptance<'_> {
    fn segment(&self) -> Option<&Segment> {
        match &self.message.target {
            Target::Segment(segment) => Some(segment),
            _ => None,
        }
    }

    fn service_id(&self) -> Option<&str> {
        match &self.message.target {
            Target::Service(service) => Some(service),
            Target::Segment(segment) => segment.service_id.as_deref(),
            _ => None,
        }
    }
}

/// What the accepting transaction did.
pub(super) enum Accepted {
    /// Stored; the people matched when it was planned at once; whether
    /// its first attempts went to the dispatchers with its commit
    /// (`due_now.rs`), so none need waking for it.
    Stored {
        matched: Option<u64>,
        dispatched: bool,
    },
    /// Another call with the same idempotency key was stored first.
    KeyTaken,
}

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
        let (plan, description, bandit) = self
            .plan_acceptance(enterprise_id, message_id, message, now, expires_at, terms)
            .await?;
        let acceptance = Acceptance {
            enterprise_id,
            message_id,
            message,
            fingerprint: &fingerprint,
            terms,
            plan,
            description,
            bandit,
            now,
            attention,
            min_cohort,
            webhooks_listening: self.webhooks_listening(),
        };
        let accepted = match self.accept_in_batch(&acceptance).await {
            Some(accepted) => accepted,
            None => self.accept_on_its_own(&acceptance).await?,
        };
        let (matched, dispatched) = match accepted {
            Accepted::Stored {
                matched,
                dispatched,
            } => (matched, dispatched),
            Accepted::KeyTaken => {
                // The key was used before, or by a concurrent call that won:
                // answer as it was answered, once its commit (perhaps this
                // very group's) is done.
                return self
                    .replay(enterprise_id, message, &fingerprint)
                    .await?
                    .ok_or_else(|| {
                        Error::Internal(anyhow::anyhow!("idempotent message vanished"))
                    });
            }
        };
        let plan = acceptance.plan;
        Ok(StoredMessage {
            row: MessageRow {
                message_id: message_id.to_owned(),
                state: if matched.is_some() {
                    MessageState::Expanded
                } else {
                    MessageState::Accepted
                },
                matched,
                accepted_at: now,
                plan: acceptance.description,
                follow_up_id: plan.follow_up_id,
                by_attributes: plan.target_kind == "segment",
            },
            created: true,
            dispatched,
        })
    }

    /// Accepts `a` in a member of its own in the accepts' group: concurrent
    /// calls share one transaction and one commit (`group.rs`).
    async fn accept_on_its_own(&self, a: &Acceptance<'_>) -> Result<Accepted> {
        Ok(on_pool!(self, pool, groups => {
            let mut tx = groups.accepts.join(pool).await?;
            let accepted = tx.accept(self, a).await?;
            match accepted {
                Accepted::Stored { .. } => tx.commit().await?,
                Accepted::KeyTaken => tx.roll_back().await?,
            }
            accepted
        }))
    }

    /// The plan of a message about to be accepted, in words too, and for
    /// `best` the bandit that draws each person's channel.
    async fn plan_acceptance(
        &self,
        enterprise_id: &str,
        message_id: &str,
        message: &NewMessage,
        now: i64,
        expires_at: i64,
        terms: &Terms,
    ) -> Result<(MessagePlan, String, Option<ChannelBandit>)> {
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
        Ok((plan, description, bandit))
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
                        dispatched: false,
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
            formatcp!("SELECT id, trace_parent FROM messages WHERE state = {ACCEPTED} ORDER BY accepted_at, id LIMIT $1"),
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

    /// A message's plan, target and state as stored.
    pub(super) async fn load(
        &self,
        message_id: &str,
    ) -> Result<Option<(MessagePlan, StoredTarget, i64)>> {
        let row: Option<PlanRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT enterprise_id, target_kind, target_service_id, seg_gender, seg_age_min, seg_age_max,
                    seg_regions, seg_occupations, all_carriers, state, policy, channels, timeout_ms,
                    max_resends, resend_until_delivered, delivery_window, window_at_carrier, priority,
                    accepted_at, expires_at, follow_up_id, follow_up_delay_ms, send_time
             FROM messages WHERE id = $1",
        )
        .bind(message_id)
        .fetch_optional(pool)
        .await)?;
        row.map(PlanRow::into_plan).transpose()
    }
}

transaction_steps! {
    /// What accepting a message does inside its (group's) transaction.
    pub(super) trait AcceptSteps {
        /// Checks, stores and (for refs or a winning bid) plans `a`: the
        /// cohort check and the audit entry of a segment in this same
        /// transaction, so neither can be missed or raced.
        async fn accept(&mut self, store: &Store, a: &Acceptance<'_>) -> Result<Accepted> {
            // The row first: a key used before is found by its unique index
            // (and answered as stored, whatever has changed since), with no
            // lookup ahead of every new message. A refusal below rolls the
            // row back with the rest of this member's work.
            let segment = a.segment().map(|s| StoredTarget {
                service_id: None,
                ..StoredTarget::of_segment(s)
            });
            let row = insert_message(
                a.message_id,
                a.fingerprint,
                a.message,
                &a.plan,
                (&a.description, a.terms.bid_id.as_deref()),
                a.service_id(),
                segment.clone(),
            );
            match self.execute_all(a.message_id, [row]).await {
                Ok(_) => {}
                Err(error) if is_unique_error(&error) => return Ok(Accepted::KeyTaken),
                Err(error) => return Err(error),
            }
            if let Some(segment) = a.segment() {
                self.judge_segment(a, segment).await?;
            }
            if let Some(service_id) = a.service_id() {
                self.check_service(a.enterprise_id, service_id, a.segment().is_some())
                    .await?;
            }
            if a.webhooks_listening {
                self.record_message_events(&[a.message_id], MessageEventKind::Accepted, "TRUE", a.now)
                    .await?;
            }
            if let (Some(follow_up), Some(follow_up_id)) = (&a.message.follow_up, &a.plan.follow_up_id) {
                let child = insert_follow_up(follow_up_id, a.message_id, follow_up, &a.plan, a.now);
                self.execute_all(a.message_id, [child]).await?;
            }
            let matched = self.plan_now(store, a, segment).await?;
            if let (Some(bid_id), Some(recipients)) = (&a.terms.bid_id, matched) {
                self.draw_on_bid(a.enterprise_id, bid_id, recipients as i64).await?;
            }
            if let Some(segment) = a.segment() {
                // The attribute use is on record in the commit that accepts
                // the message: never one without the other.
                let entry = AuditEntry::new(
                    format!("enterprise:{}", a.enterprise_id),
                    "attributes.used",
                    a.message_id,
                    format!("purpose: targeting; fields: {}", segment.fields()),
                );
                self.append_audit(a.now, &[&entry]).await?;
            }
            Ok(Accepted::Stored {
                matched,
                dispatched: false,
            })
        }

        /// Holds segment sends one at a time, hub-wide, until this one
        /// commits, and checks the minimum cohort: the check then sees every
        /// segment message accepted before it, so two concurrent sends cannot
        /// each pass against the other and together single a person out. The
        /// lock is the audit chain's head, which this transaction extends
        /// anyway (the attribute use, in `accept`).
        async fn judge_segment(&mut self, a: &Acceptance<'_>, segment: &Segment) -> Result<()> {
            sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
                .execute(&mut *self)
                .await?;
            self.check_cohort(a.enterprise_id, segment, a.min_cohort, a.now)
                .await
        }

        /// Plans the people a message reaches now, when it reaches them at
        /// acceptance: its refs, or a campaign that draws on a winning bid
        /// (expanded at once, to know what it draws). `None` for a campaign
        /// the expander plans later.
        async fn plan_now(
            &mut self,
            store: &Store,
            a: &Acceptance<'_>,
            segment: Option<StoredTarget>,
        ) -> Result<Option<u64>> {
            if let Target::Refs(refs) = &a.message.target {
                return Ok(Some(self.plan_targeted(store, a, refs).await?));
            }
            if a.terms.bid_id.is_none() {
                return Ok(None);
            }
            let target = StoredTarget {
                service_id: a.service_id().map(str::to_owned),
                ..segment.unwrap_or_default()
            };
            let everyone = &UserRange::EVERYONE;
            let statements = campaign_statements(a.message_id, &a.plan, &target, a.now, a.attention, everyone);
            self.execute_all(a.message_id, statements).await?;
            self.time_per_person(store, a.message_id, &a.plan, a.now, everyone).await?;
            Ok(Some(self.finish_expansion(a.message_id, everyone, 0, a.now, a.webhooks_listening).await?))
        }

        /// Refuses `service_id` unless it is one of `enterprise_id`'s services.
        async fn check_service(
            &mut self,
            enterprise_id: &str,
            service_id: &str,
            in_segment: bool,
        ) -> Result<()> {
            let owned: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(1 AS BIGINT) FROM services WHERE id = $1 AND enterprise_id = $2",
            )
            .bind(service_id)
            .bind(enterprise_id)
            .fetch_optional(&mut *self)
            .await?;
            if owned.is_none() {
                let field = if in_segment { "target.segment.service_id" } else { "target.service_id" };
                return Err(Error::not_found(field, "no such service of this enterprise"));
            }
            Ok(())
        }

        /// The first of `refs` not registered with `enterprise_id`, named.
        async fn check_refs(&mut self, enterprise_id: &str, refs: &[String]) -> Result<()> {
            let mut registered = HashSet::with_capacity(refs.len());
            for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(
                    "SELECT user_ref FROM registrations WHERE enterprise_id = ",
                );
                query.push_bind(enterprise_id).push(" AND user_ref IN (");
                let mut list = query.separated(", ");
                for user_ref in chunk {
                    list.push_bind(user_ref);
                }
                query.push(")");
                let rows: Vec<String> = query.build_query_scalar().fetch_all(&mut *self).await?;
                registered.extend(rows);
            }
            if let Some(index) = refs.iter().position(|r| !registered.contains(r)) {
                return Err(Error::not_found(
                    format!("target.refs[{index}]"),
                    "not registered with this enterprise",
                ));
            }
            Ok(())
        }

        /// Plans a refs message's attempts at once: each ref's user and
        /// their contracts (one statement), their channels and times, quiet
        /// periods around it, the priority lane; the people matched. Fewer
        /// people than refs: a ref is not registered (named, and everything
        /// rolled back), or someone has no contract.
        async fn plan_targeted(&mut self, store: &Store, a: &Acceptance<'_>, refs: &[String]) -> Result<u64> {
            let (message_id, plan, now) = (a.message_id, &a.plan, a.now);
            let timing = plan.timing(now).unwrap_or((now, now));
            let choices = planning::first_channels(&plan.policy, None);
            for chunk in refs.chunks(ROWS_PER_STATEMENT) {
                // A targeted message goes before campaigns' backlogs.
                let statements = planning::insert_attempts(message_id, &choices, timing, now, ("", Lane::Priority), |sql| {
                    let all = sql.bind(Param::Bool(plan.all_carriers));
                    let enterprise = sql.bind(Param::Text(a.enterprise_id.to_owned()));
                    let mut list = Vec::with_capacity(chunk.len());
                    for user_ref in chunk {
                        list.push(sql.bind(Param::Text(user_ref.clone())));
                    }
                    sql.push(&format!(
                        " FROM registrations r JOIN contracts c ON c.user_id = r.user_id
                         WHERE r.enterprise_id = {enterprise} AND r.user_ref IN ({}) AND (c.is_primary OR {all})",
                        list.join(", ")
                    ));
                });
                self.execute_all(message_id, statements).await?;
            }
            let everyone = &UserRange::EVERYONE;
            if let Some(bandit) = &a.bandit {
                self.choose_channels_per_person(store, message_id, bandit, everyone).await?;
            }
            self.time_per_person(store, message_id, plan, now, everyone).await?;
            let quiet = planning::open_quiet_periods(message_id, timing.0, now, a.attention);
            self.execute_all(message_id, quiet).await?;
            let matched = self.finish_expansion(message_id, everyone, 0, now, a.webhooks_listening).await?;
            let refs_given = refs.iter().collect::<HashSet<_>>().len();
            if (matched as usize) < refs_given {
                self.check_refs(a.enterprise_id, refs).await?;
            }
            Ok(matched)
        }
    }
}
