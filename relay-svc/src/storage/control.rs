//! Delivery control after planning, in SQL: the follow-through that fires
//! fallback/resend timers and reacts to unsupported channels, rolls deliveries
//! held at the relay to the window's next opening, expires what was not handed
//! over in time — each a set-based statement per (message, attempt) group —
//! and reads a delivery's decision trace back for `explain`.

use std::collections::HashMap;

use const_format::formatcp;

use super::planning::{MessagePlan, PlanSteps, Sql, timestamp};
use super::states::{ACCEPTED, DeliveryState, EXPIRED, HANDED_OVER, PENDING, UNSENT, WAITING};
use super::{CountSteps, Param, Store, WritePool, on_pool, on_write};
use crate::error::{Error, Result};
use crate::policy::{PolicyKind, Trigger};
use crate::receipts::{EventKind, MessageEventKind};
use crate::targeting::Channel;

/// Groups of attempts one pass looks at, at most.
const GROUPS_PER_PASS: i64 = 256;

/// What one pass of the follow-through did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowThrough {
    /// Attempt groups whose timer or unsupported channel was acted on.
    pub groups: u64,
    /// Messages whose held deliveries rolled to the window's next opening.
    pub rolled: u64,
    /// Messages swept at their expiry.
    pub expired: u64,
    /// Waiting deliveries whose time came (now due for their dispatcher).
    pub released: u64,
}

impl FollowThrough {
    pub fn did_anything(&self) -> bool {
        *self != Self::default()
    }
}

/// When and how often the reconciliation offers a delivery the carrier never
/// confirmed again, before the message's expiry settles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconciling {
    /// A handed-over delivery without a delivered, failed or expired receipt
    /// this long (clock ms) is offered again; a message expired this long is
    /// settled.
    pub after_ms: i64,
    /// Offers after the first, at most.
    pub max_reoffers: i64,
}

/// What one reconciliation pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Messages looked at.
    pub messages: u64,
    /// Deliveries offered to their carrier again.
    pub reoffered: u64,
    /// Handed-over deliveries of expired messages that no carrier confirmed,
    /// expired at the relay.
    pub expired: u64,
    /// Messages with nothing left to reconcile (not looked at again).
    pub settled: u64,
}

/// A handed-over delivery (`d`) of message `m` the carrier never confirmed:
/// its person has no delivered or failed event for the message. (An expired
/// or unsupported receipt closes its own delivery: state 3 or 2.)
fn unconfirmed(m: &str) -> String {
    format!(
        "d.message_id = {m} AND d.state = {HANDED_OVER} AND NOT EXISTS (SELECT 1 FROM events e \
         WHERE e.message_id = d.message_id AND e.user_id = d.user_id AND e.kind IN ({}, {}))",
        EventKind::Delivered.number(),
        EventKind::Failed.number(),
    )
}

/// One delivery attempt, as the decision trace shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: u32,
    pub channel: Option<Channel>,
    pub state: &'static str,
    pub not_before: i64,
    pub handed_over_at: Option<i64>,
    /// Why it exists and what was decided about it since.
    pub reason: String,
    pub carrier_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedEvent {
    pub kind: EventKind,
    pub at: i64,
    pub channel: Option<Channel>,
}

/// Why and how one message went to one person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub plan: String,
    pub attempts: Vec<Attempt>,
    pub events: Vec<ExplainedEvent>,
}

/// One attempt as `explain` reads it.
#[derive(sqlx::FromRow)]
struct AttemptRow {
    attempt: i64,
    channel: i64,
    state: i64,
    not_before: i64,
    handed_over_at: Option<i64>,
    reason: String,
    note: String,
    carrier_id: String,
}

impl Store {
    /// One pass: expiry, window rolls, timers and unsupported channels,
    /// then waiting deliveries released.
    pub async fn follow_through(&self, now: i64) -> Result<FollowThrough> {
        let mut plans: HashMap<String, Option<MessagePlan>> = HashMap::new();
        // Expiry first, so nothing expired gets another attempt below.
        let expired = self.expire_messages(now).await?;
        let rolled = self.roll_closed_windows(now, &mut plans).await?;
        let groups = self.run_timers(now, &mut plans).await?;
        // Waiting deliveries whose time has come become due, so dispatchers
        // never read past rows that may not go yet.
        let released = on_write!(self, pool => sqlx::query(
            formatcp!("UPDATE deliveries SET state = {PENDING} WHERE state = {WAITING} AND not_before <= $1"),
        )
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(FollowThrough {
            expired,
            rolled,
            groups,
            released,
        })
    }

    /// Closes messages past their expiry: what was not handed over expires.
    /// A campaign still being expanded is closed once its last step is
    /// planned, so no step adds attempts to a closed message.
    async fn expire_messages(&self, now: i64) -> Result<u64> {
        let mut expired = 0;
        let expiring: Vec<String> = on_pool!(self, pool => sqlx::query_scalar(
            formatcp!("SELECT id FROM messages WHERE closed = FALSE AND expires_at <= $1 AND state <> {ACCEPTED}
             ORDER BY expires_at LIMIT $2"),
        )
        .bind(now)
        .bind(GROUPS_PER_PASS)
        .fetch_all(pool)
        .await)?;
        let listening = self.webhooks_listening();
        for message_id in expiring {
            let mut statements = expire_deliveries(
                &message_id,
                Closing::Unsent,
                "expired at the relay: not handed over before the message's expiry",
                now,
            );
            let mut close = Sql::new(
                "UPDATE deliveries SET check_at = NULL WHERE check_at IS NOT NULL AND message_id = ",
            );
            let m = close.bind(Param::Text(message_id.clone()));
            close.push(&m);
            statements.push(close);
            let mut closed = Sql::new("UPDATE messages SET closed = TRUE WHERE id = ");
            let m = closed.bind(Param::Text(message_id.clone()));
            closed.push(&m);
            statements.push(closed);
            // Closed, with its final counts in its `message.completed` event.
            on_write!(self, pool => {
                let mut tx = pool.begin_write().await?;
                tx.execute_all(&message_id, statements).await?;
                if listening {
                    tx.record_message_events(&[message_id.as_str()], MessageEventKind::Completed, "TRUE", now)
                        .await?;
                }
                tx.commit().await?;
                Ok::<(), crate::error::Error>(())
            })?;
            expired += 1;
        }
        Ok(expired)
    }

    /// Held-at-relay windows that closed on pending deliveries: held for the
    /// next opening, or expired when there is none.
    async fn roll_closed_windows(
        &self,
        now: i64,
        plans: &mut HashMap<String, Option<MessagePlan>>,
    ) -> Result<u64> {
        let mut rolled = 0;
        let closed_windows: Vec<String> = on_pool!(self, pool => sqlx::query_scalar(
            formatcp!("SELECT DISTINCT message_id FROM deliveries WHERE state IN {UNSENT} AND window_close <= $1 LIMIT $2"),
        )
        .bind(now)
        .bind(GROUPS_PER_PASS)
        .fetch_all(pool)
        .await)?;
        for message_id in closed_windows {
            let Some(plan) = self.cached_plan(plans, &message_id).await? else {
                continue;
            };
            let statements = match plan.timing(now) {
                Some((open, close)) => {
                    let mut roll = Sql::new(formatcp!(
                        "UPDATE deliveries SET state = {WAITING}, not_before = CASE WHEN not_before > "
                    ));
                    let open_a = roll.bind(Param::Int(open));
                    let open_b = roll.bind(Param::Int(open));
                    let close = roll.bind(Param::Int(close));
                    let note = roll.bind(Param::Text(format!(
                        "window closed before hand-over; held for the next opening at {}",
                        timestamp(open)
                    )));
                    let m = roll.bind(Param::Text(message_id.clone()));
                    let at = roll.bind(Param::Int(now));
                    roll.push(&format!(
                        "{open_a} THEN not_before ELSE {open_b} END, window_close = {close}, note = {note} \
                         WHERE message_id = {m} AND state IN {UNSENT} AND window_close <= {at}"
                    ));
                    vec![roll]
                }
                None => expire_deliveries(
                    &message_id,
                    Closing::UnsentInClosedWindow,
                    "expired at the relay: the delivery window ended before hand-over",
                    now,
                ),
            };
            self.run_statements(&message_id, statements).await?;
            rolled += 1;
        }
        Ok(rolled)
    }

    /// Timers that ran out, and attempts whose channel the terminal lacks:
    /// the policy's next attempt, and the timer cleared.
    async fn run_timers(
        &self,
        now: i64,
        plans: &mut HashMap<String, Option<MessagePlan>>,
    ) -> Result<u64> {
        let mut handled = 0;
        let groups: Vec<(String, i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT message_id, channel, attempt, state FROM deliveries
             WHERE check_at IS NOT NULL AND check_at <= $1
             GROUP BY message_id, channel, attempt, state LIMIT $2",
        )
        .bind(now)
        .bind(GROUPS_PER_PASS)
        .fetch_all(pool)
        .await)?;
        for (message_id, channel, attempt, state) in groups {
            let plan = self.cached_plan(plans, &message_id).await?;
            let mut statements = Vec::new();
            let group_filter = |sql: &mut Sql| {
                let m = sql.bind(Param::Text(message_id.clone()));
                let c = sql.bind(Param::Int(channel));
                let a = sql.bind(Param::Int(attempt));
                let s = sql.bind(Param::Int(state));
                let at = sql.bind(Param::Int(now));
                format!(
                    "message_id = {m} AND channel = {c} AND attempt = {a} AND state = {s} AND check_at IS NOT NULL AND check_at <= {at}"
                )
            };
            if let Some(plan) = plan.filter(|p| p.expires_at > now) {
                statements.extend(next_attempts(
                    &plan,
                    channel,
                    attempt,
                    state,
                    now,
                    group_filter,
                ));
            }
            let mut clear = Sql::new("UPDATE deliveries SET check_at = NULL WHERE ");
            let filter = group_filter(&mut clear);
            clear.push(&filter);
            statements.push(clear);
            self.run_statements(&message_id, statements).await?;
            handled += 1;
        }
        Ok(handled)
    }

    /// One reconciliation pass over messages last looked at `after_ms` ago:
    /// handed-over deliveries the carrier never confirmed are offered again
    /// (state pending; the carrier drops a delivery id it still holds) up to
    /// `max_reoffers` times while the message is live — not when the carrier
    /// holds them for a window —, and expired at the relay (with an expired
    /// event, and a note in the decision trace) once the message expired
    /// `after_ms` ago. A message with nothing left unsent, unconfirmed or on
    /// a timer is settled and not looked at again; follow-ups settle at
    /// their expiry (their deliveries come with opens).
    pub async fn reconcile_deliveries(&self, now: i64, rules: Reconciling) -> Result<Reconciled> {
        let mut done = Reconciled::default();
        let due: Vec<(String, bool, i64, bool, String)> = on_pool!(self, pool => sqlx::query_as(
            formatcp!("SELECT id, closed, expires_at, window_at_carrier, target_kind FROM messages
             WHERE reconciled_at IS NOT NULL AND reconciled_at <= $1 AND state <> {ACCEPTED}
             ORDER BY reconciled_at LIMIT $2"),
        )
        .bind(now - rules.after_ms)
        .bind(GROUPS_PER_PASS)
        .fetch_all(pool)
        .await)?;
        for (message_id, closed, expires_at, held_at_carrier, target_kind) in due {
            done.messages += 1;
            let m = |sql: &mut Sql| sql.bind(Param::Text(message_id.clone()));
            let mut statements = Vec::new();
            let settling = closed && expires_at <= now - rules.after_ms;
            if settling {
                statements.extend(expire_deliveries(
                    &message_id,
                    Closing::Unconfirmed,
                    "expired at the relay: handed over, but no carrier confirmed it by the message's expiry",
                    now,
                ));
            } else if !closed && !held_at_carrier {
                let mut offer = Sql::new(formatcp!(
                    "UPDATE deliveries SET state = {PENDING}, offers = offers + 1, note = "
                ));
                let note = offer.bind(Param::Text(format!(
                    "no receipt within {} of hand-over: offered to the carrier again",
                    crate::policy::duration(rules.after_ms)
                )));
                let deadline = offer.bind(Param::Int(now - rules.after_ms));
                let max = offer.bind(Param::Int(rules.max_reoffers));
                let message = m(&mut offer);
                offer.push(&format!(
                    "{note} WHERE id IN (SELECT d.id FROM deliveries d WHERE {} \
                     AND d.handed_over_at <= {deadline} AND d.offers < {max})",
                    unconfirmed(&message)
                ));
                statements.push(offer);
            }
            // Settled once nothing can change any more; else looked at again later.
            let mut settle = Sql::new("UPDATE messages SET reconciled_at = NULL WHERE id = ");
            let message = m(&mut settle);
            settle.push(&message);
            if !settling {
                if closed || target_kind == "follow_up" {
                    settle.push(" AND FALSE");
                } else {
                    settle.push(&format!(
                        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = {message} \
                         AND (d.state IN {UNSENT} OR d.check_at IS NOT NULL)) \
                         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE {})",
                        unconfirmed(&message)
                    ));
                }
            }
            statements.push(settle);
            let mut again = Sql::new("UPDATE messages SET reconciled_at = ");
            let at = again.bind(Param::Int(now));
            let message = m(&mut again);
            again.push(&format!(
                "{at} WHERE id = {message} AND reconciled_at IS NOT NULL"
            ));
            statements.push(again);
            let shape = (settling, !settling && !closed && !held_at_carrier);
            let affected = self.run_counting(&message_id, statements).await?;
            // [expired events, expired deliveries] or [offered], then [settled, again].
            let (expired, reoffered) = match shape {
                (true, _) => (affected[1], 0),
                (false, true) => (0, affected[0]),
                (false, false) => (0, 0),
            };
            done.expired += expired;
            done.reoffered += reoffered;
            done.settled += affected[affected.len() - 2];
        }
        Ok(done)
    }

    async fn cached_plan(
        &self,
        plans: &mut HashMap<String, Option<MessagePlan>>,
        message_id: &str,
    ) -> Result<Option<MessagePlan>> {
        if let Some(plan) = plans.get(message_id) {
            return Ok(plan.clone());
        }
        let plan = self.message_plan(message_id).await?;
        plans.insert(message_id.to_owned(), plan.clone());
        Ok(plan)
    }

    async fn run_statements(&self, message_id: &str, statements: Vec<Sql>) -> Result<()> {
        self.run_counting(message_id, statements).await.map(|_| ())
    }

    /// Runs `statements` in one transaction; the rows each affected.
    async fn run_counting(&self, message_id: &str, statements: Vec<Sql>) -> Result<Vec<u64>> {
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let affected = tx.execute_all(message_id, statements).await?;
            tx.commit().await?;
            Ok(affected)
        })
    }

    /// The decision trace of `message_id` for `user_id`: the message's plan,
    /// every attempt with why it exists, and the person's events.
    pub async fn explain(&self, message_id: &str, user_id: &str) -> Result<Explanation> {
        type Found = (
            Option<(String, String)>,
            Vec<AttemptRow>,
            Vec<(i64, i64, i64)>,
        );
        let (plan, attempts, events): Found = on_pool!(self, pool => {
            let plan = sqlx::query_as("SELECT plan, policy FROM messages WHERE id = $1")
                .bind(message_id)
                .fetch_optional(pool)
                .await?;
            let attempts = sqlx::query_as(
                "SELECT attempt, channel, state, not_before, handed_over_at, reason, note, carrier_id
                 FROM deliveries WHERE message_id = $1 AND user_id = $2 ORDER BY attempt, id",
            )
            .bind(message_id)
            .bind(user_id)
            .fetch_all(pool)
            .await?;
            let events = sqlx::query_as(
                "SELECT kind, at, channel FROM events WHERE message_id = $1 AND user_id = $2 ORDER BY at, kind",
            )
            .bind(message_id)
            .bind(user_id)
            .fetch_all(pool)
            .await?;
            (plan, attempts, events)
        });
        let Some((plan, policy)) = plan else {
            return Err(Error::not_found("message_id", "no such message"));
        };
        Ok(Explanation {
            attempts: attempts
                .into_iter()
                .map(|row: AttemptRow| {
                    let mut why = if row.reason.is_empty() {
                        format!("first attempt under {}", policy.replace('_', " "))
                    } else {
                        row.reason
                    };
                    if !row.note.is_empty() {
                        why.push_str("; ");
                        why.push_str(&row.note);
                    }
                    Attempt {
                        attempt: row.attempt as u32,
                        channel: Channel::from_number(row.channel),
                        state: DeliveryState::from_number(row.state)
                            .map_or("unknown", DeliveryState::name),
                        not_before: row.not_before,
                        handed_over_at: row.handed_over_at,
                        reason: why,
                        carrier_id: row.carrier_id,
                    }
                })
                .collect(),
            events: events
                .into_iter()
                .filter_map(|(kind, at, channel)| {
                    EventKind::from_number(kind).map(|kind| ExplainedEvent {
                        kind,
                        at,
                        channel: Channel::from_number(channel),
                    })
                })
                .collect(),
            plan,
        })
    }
}

/// Expire `message_id`'s pending deliveries (only those whose held window
/// closed, when `closed_windows_only`): an expired event for each person not
/// already delivered to, then the rows.
/// Which deliveries of a message an expiry closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    /// Not handed over yet (pending or waiting).
    Unsent,
    /// Not handed over yet, held for a window that has closed.
    UnsentInClosedWindow,
    /// Handed over, never confirmed by a carrier.
    Unconfirmed,
}

/// Expires `which` deliveries of `message_id`: an expired event for each
/// person not delivered, and the deliveries closed with `note`.
fn expire_deliveries(message_id: &str, which: Closing, note: &str, now: i64) -> Vec<Sql> {
    let pending = |sql: &mut Sql| {
        let m = sql.bind(Param::Text(message_id.to_owned()));
        match which {
            Closing::Unsent => format!("d.message_id = {m} AND d.state IN {UNSENT}"),
            Closing::UnsentInClosedWindow => {
                let at = sql.bind(Param::Int(now));
                format!("d.message_id = {m} AND d.state IN {UNSENT} AND d.window_close <= {at}")
            }
            Closing::Unconfirmed => unconfirmed(&m),
        }
    };
    let mut record = Sql::new(
        "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region) SELECT d.message_id, d.user_id, ",
    );
    let kind = record.bind(Param::Int(EventKind::Expired.number()));
    let at = record.bind(Param::Int(now));
    let delivered = record.bind(Param::Int(EventKind::Delivered.number()));
    let filter = pending(&mut record);
    record.push(&format!(
        "{kind}, {at}, d.carrier_id, d.channel, '' FROM deliveries d WHERE {filter} \
         AND NOT EXISTS (SELECT 1 FROM events e WHERE e.message_id = d.message_id AND e.user_id = d.user_id AND e.kind = {delivered}) \
         ON CONFLICT DO NOTHING"
    ));
    let mut close = Sql::new(formatcp!(
        "UPDATE deliveries SET state = {EXPIRED}, check_at = NULL, note = "
    ));
    let note = close.bind(Param::Text(note.to_owned()));
    close.push(&format!(
        "{note} WHERE id IN (SELECT d.id FROM deliveries d WHERE "
    ));
    let filter = pending(&mut close);
    close.push(&filter).push(")");
    vec![record, close]
}

/// The next attempt the policy of `plan` makes for one group of attempts
/// (same channel, attempt number and state) whose timer ran out or whose
/// channel the terminal lacks — for the people who have not yet opened (or,
/// resending until delivered, received) the message; `None`: no next attempt.
fn next_attempts(
    plan: &MessagePlan,
    channel: i64,
    attempt: i64,
    state: i64,
    now: i64,
    group_filter: impl Fn(&mut Sql) -> String,
) -> Option<Sql> {
    let trigger = if state == 2 {
        Trigger::Unsupported
    } else {
        Trigger::Timeout
    };
    let next = plan
        .policy
        .next(Channel::from_number(channel), attempt as u32, trigger);
    if let (Some((next_channel, reason)), Some((not_before, window_close))) =
        (next, plan.timing(now))
    {
        let stop = if plan.policy.kind == PolicyKind::Resend
            && plan.policy.resend_until_delivered
            && trigger == Trigger::Timeout
        {
            EventKind::Delivered
        } else {
            EventKind::Opened
        };
        let mut insert = Sql::new(
            "INSERT INTO deliveries (message_id, user_id, carrier_id, channel, attempt, state, not_before, window_close, reason) \
             SELECT message_id, user_id, carrier_id, ",
        );
        let ch = insert.bind(Param::Int(Channel::number(next_channel)));
        let waits = insert.bind(Param::Int(if not_before > now { WAITING } else { PENDING }));
        let nb = insert.bind(Param::Int(not_before));
        let wc = insert.bind(Param::window_close(window_close));
        let why = insert.bind(Param::Text(reason));
        let stop = insert.bind(Param::Int(stop.number()));
        let filter = group_filter(&mut insert);
        insert.push(&format!(
            "{ch}, attempt + 1, {waits}, {nb}, {wc}, {why} FROM deliveries d WHERE {filter} \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.message_id = d.message_id AND e.user_id = d.user_id AND e.kind = {stop}) \
             ON CONFLICT DO NOTHING"
        ));
        return Some(insert);
    }
    None
}
