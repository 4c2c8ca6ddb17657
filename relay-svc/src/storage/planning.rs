//! Planning in SQL: the statements that turn a message's recipients into
//! delivery attempts (channel by policy, timing by window), hold people's
//! other messages off around a targeted one (quiet periods), and spare people
//! who stopped opening (fatigue). Every statement is set-based over the whole
//! message, or over one range of its people (a step of a campaign's
//! expansion, [`UserRange`]); this module builds them and [`PlanSteps::execute_all`] runs them
//! inside the caller's transaction on either backend.

use chukei_proto::window::Window;
use const_format::formatcp;

use super::audience::UserRange;
use super::states::{PENDING, SKIPPED, UNSENT, WAITING};
use super::{CountSteps, Lane, Param, transaction_steps};
use crate::error::Result;
use crate::learning::OpenCounts;
use crate::policy::{
    AttentionConfig, Policy, PolicyKind, Priority, SCORE_SEND_SHIFT, SCORE_START, SendTime,
    WindowMode, channel_name,
};
use crate::receipts::{DEFERRED_COUNT, EventKind};
use crate::targeting::Channel;

/// A statement with its binds, numbered `$1…` in order.
#[derive(Debug, Default)]
pub(super) struct Sql {
    pub text: String,
    pub params: Vec<Param>,
    /// What the rows it touches count as in `message_counts`.
    pub effect: Effect,
}

/// How a statement's result feeds the message counts, for what is counted
/// but is not an event (deferrals): events count themselves (migration 0016).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Effect {
    #[default]
    None,
    /// Rows affected count as `kind` for the statement's message.
    Count(i64),
    /// The statement returns one `message_id` per row; each counts as `kind`
    /// for its own message.
    CountReturned(i64),
}

impl Sql {
    pub(crate) fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            ..Self::default()
        }
    }

    /// Binds `param` and returns its placeholder.
    pub(crate) fn bind(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params.len())
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// `INSERT INTO table (columns…) VALUES (binds…)`, a column and its value per pair.
    pub(crate) fn insert(table: &str, row: Vec<(&str, Param)>) -> Self {
        Self::insert_computed(table, row, &[])
    }

    /// [`Sql::insert`] with more columns whose values are SQL expressions
    /// (e.g. a scalar subquery), a column and its expression per pair.
    pub(crate) fn insert_computed(
        table: &str,
        row: Vec<(&str, Param)>,
        computed: &[(&str, &str)],
    ) -> Self {
        let mut sql = Self::default();
        let (mut columns, mut values): (Vec<&str>, Vec<String>) = row
            .into_iter()
            .map(|(column, value)| (column, sql.bind(value)))
            .unzip();
        for (column, expression) in computed {
            columns.push(column);
            values.push((*expression).to_owned());
        }
        sql.push(&format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            columns.join(", "),
            values.join(", ")
        ));
        sql
    }

    fn counting(mut self, effect: Effect) -> Self {
        self.effect = effect;
        self
    }
}

/// `query` with `params` bound in order.
pub(super) fn bind_params<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, DB::Arguments>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for param in params {
        query = match param {
            Param::Text(value) => query.bind(value),
            Param::Int(value) => query.bind(value),
            Param::Bool(value) => query.bind(value),
            Param::OptInt(value) => query.bind(value),
            Param::OptText(value) => query.bind(value),
        };
    }
    query
}

transaction_steps! {
    /// Running the statements this module builds.
    pub(super) trait PlanSteps {
        /// Runs planning `statements` for message `message_id`, adding their
        /// effects to its counts; the rows each statement affected (or returned).
        async fn execute_all(
            &mut self,
            message_id: &str,
            statements: impl IntoIterator<Item = Sql>,
        ) -> Result<Vec<u64>> {
            let mut affected: Vec<u64> = Vec::new();
            for statement in statements {
                let query = bind_params(sqlx::query(sqlx::AssertSqlSafe(statement.text)), statement.params);
                match statement.effect {
                    Effect::None => {
                        affected.push(query.execute(&mut *self).await?.rows_affected());
                    }
                    Effect::Count(kind) => {
                        let rows = query.execute(&mut *self).await?.rows_affected();
                        affected.push(rows);
                        self.add_to_counts([((message_id.to_owned(), kind), rows as i64)]).await?;
                    }
                    Effect::CountReturned(kind) => {
                        let rows = query.fetch_all(&mut *self).await?;
                        affected.push(rows.len() as u64);
                        let mut added: std::collections::HashMap<(String, i64), i64> =
                            std::collections::HashMap::new();
                        for row in rows {
                            let message_id: String = sqlx::Row::try_get(&row, 0)?;
                            *added.entry((message_id, kind)).or_default() += 1;
                        }
                        self.add_to_counts(added).await?;
                    }
                }
            }
            Ok(affected)
        }

        /// Runs `SELECT COUNT(…)` statement `sql`.
        async fn count(&mut self, sql: Sql) -> Result<u64> {
            let row = bind_params(sqlx::query(sqlx::AssertSqlSafe(sql.text)), sql.params)
                .fetch_one(&mut *self)
                .await?;
            let count: i64 = sqlx::Row::try_get(&row, 0)?;
            Ok(count.max(0) as u64)
        }
    }
}

/// Everything stored about how one message is delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagePlan {
    pub enterprise_id: String,
    /// refs, all, service, segment or follow_up.
    pub target_kind: String,
    pub policy: Policy,
    pub all_carriers: bool,
    pub window: Option<Window>,
    pub window_mode: WindowMode,
    pub priority: Priority,
    pub accepted_at: i64,
    pub expires_at: i64,
    pub follow_up_id: Option<String>,
    pub follow_up_delay_ms: i64,
    pub send_time: Option<SendTime>,
}

impl MessagePlan {
    /// Campaigns (not targeted at named refs, not follow-ups) are the messages
    /// quiet periods and fatigue apply to.
    pub fn is_campaign(&self) -> bool {
        !matches!(self.target_kind.as_str(), "refs" | "follow_up")
    }

    /// When a delivery planned at `now` may first go, and when a held-at-relay
    /// window closes on it: `None` when the window never opens again.
    pub fn timing(&self, now: i64) -> Option<(i64, i64)> {
        match (&self.window, self.window_mode) {
            (Some(window), WindowMode::HeldAtRelay) => window
                .opening(now)
                .map(|(open, close)| (open.max(now), close)),
            _ => Some((now, i64::MAX)),
        }
    }
}

/// Which channel a planned attempt gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChannelChoice {
    Fixed(Option<Channel>),
    /// The person's most-opened channel, else this one.
    MostUsed(Option<Channel>),
}

/// The first attempts' channels of a message under its policy; `best` is the
/// channel the estimate chose (for `best` only).
pub(crate) fn first_channels(policy: &Policy, best: Option<Channel>) -> Vec<ChannelChoice> {
    let first = policy.channels.first().copied();
    match policy.kind {
        PolicyKind::Multi => policy
            .channels
            .iter()
            .map(|c| ChannelChoice::Fixed(Some(*c)))
            .collect(),
        PolicyKind::MostUsed => vec![ChannelChoice::MostUsed(first)],
        PolicyKind::Best => vec![ChannelChoice::Fixed(best.or(first))],
        PolicyKind::Fixed | PolicyKind::Fallback | PolicyKind::Resend => {
            vec![ChannelChoice::Fixed(first)]
        }
    }
}

/// `INSERT` the first attempt(s) of `message_id` for the recipients that
/// `source` selects; `source` appends `FROM … WHERE …` with the contracts
/// table aliased `c`. The attempts go in `lane`.
pub(super) fn insert_attempts(
    message_id: &str,
    choices: &[ChannelChoice],
    (not_before, window_close): (i64, i64),
    now: i64,
    (reason, lane): (&str, Lane),
    source: impl Fn(&mut Sql),
) -> Vec<Sql> {
    let state = if not_before > now { WAITING } else { PENDING };
    choices
        .iter()
        .map(|choice| {
            let mut sql = Sql::new(
                "INSERT INTO deliveries (message_id, user_id, carrier_id, channel, attempt, state, not_before, window_close, reason, lane) SELECT ",
            );
            let m = sql.bind(Param::Text(message_id.to_owned()));
            let channel = match choice {
                ChannelChoice::Fixed(channel) => sql.bind(Param::Int(Channel::number(*channel))),
                ChannelChoice::MostUsed(default) => {
                    let default = sql.bind(Param::Int(Channel::number(*default)));
                    format!(
                        "COALESCE((SELECT o.channel FROM person_channels o WHERE o.user_id = c.user_id AND o.channel > 0 \
                         GROUP BY o.channel HAVING SUM(o.opened) > 0 ORDER BY SUM(o.opened) DESC, o.channel LIMIT 1), {default})"
                    )
                }
            };
            let state = sql.bind(Param::Int(state));
            let nb = sql.bind(Param::Int(not_before));
            let wc = sql.bind(Param::window_close(window_close));
            let why = sql.bind(Param::Text(reason.to_owned()));
            let lane = sql.bind(Param::Int(lane as i64));
            sql.push(&format!(
                "{m}, c.user_id, c.carrier_id, {channel}, 0, {state}, {nb}, {wc}, {why}, {lane}"
            ));
            source(&mut sql);
            sql.push(" ON CONFLICT DO NOTHING");
            sql
        })
        .collect()
}

/// After a targeted message's attempts are inserted: open a quiet period of
/// `q` either side of its send time `at` for each recipient, and defer their
/// pending campaign deliveries that would otherwise go inside it.
pub(super) fn open_quiet_periods(
    message_id: &str,
    at: i64,
    now: i64,
    attention: &AttentionConfig,
) -> Vec<Sql> {
    let q = attention.quiet_period_ms;
    if q <= 0 {
        return Vec::new();
    }
    let mut create = Sql::new(
        "INSERT INTO quiet_periods (message_id, user_id, starts_at, ends_at) SELECT DISTINCT ",
    );
    let m = create.bind(Param::Text(message_id.to_owned()));
    let starts = create.bind(Param::Int(at - q));
    let ends = create.bind(Param::Int(at + q));
    let m2 = create.bind(Param::Text(message_id.to_owned()));
    create.push(&format!(
        "{m}, user_id, {starts}, {ends} FROM deliveries WHERE message_id = {m2} ON CONFLICT DO NOTHING"
    ));

    // A pending delivery falls inside the period when it would go out at or
    // after its start: anything already due does, if the period has begun.
    let lower = if now >= at - q { i64::MIN } else { at - q };
    let mut defer = Sql::new(formatcp!(
        "UPDATE deliveries SET state = {WAITING}, not_before = "
    ));
    let until = defer.bind(Param::Int(at + q));
    let note = defer.bind(Param::Text(format!(
        "deferred until {}: quiet period around a targeted message",
        timestamp(at + q)
    )));
    let until2 = defer.bind(Param::Int(at + q));
    let lower = defer.bind(Param::Int(lower));
    let m = defer.bind(Param::Text(message_id.to_owned()));
    defer.push(&format!(
        "{until}, note = {note} WHERE state IN {UNSENT} AND not_before < {until2} AND not_before >= {lower} \
         AND user_id IN (SELECT user_id FROM quiet_periods WHERE message_id = {m}) \
         AND message_id IN (SELECT id FROM messages WHERE closed = FALSE AND target_kind NOT IN ('refs', 'follow_up')) \
         RETURNING message_id"
    ));
    vec![
        create,
        defer.counting(Effect::CountReturned(DEFERRED_COUNT)),
    ]
}

/// After a campaign's attempts are inserted: defer those of `users` whose
/// recipient is inside someone's quiet period at send time `at`.
pub(super) fn defer_for_quiet_periods(message_id: &str, at: i64, users: &UserRange) -> Sql {
    let mut sql = Sql::new(formatcp!(
        "UPDATE deliveries SET state = {WAITING}, not_before = "
    ));
    let inside = |sql: &mut Sql| {
        let a = sql.bind(Param::Int(at));
        let b = sql.bind(Param::Int(at));
        format!(
            "FROM quiet_periods q WHERE q.user_id = deliveries.user_id AND q.starts_at <= {a} AND q.ends_at > {b}"
        )
    };
    let first = inside(&mut sql);
    let note = sql.bind(Param::Text(
        "deferred: quiet period around a targeted message".to_owned(),
    ));
    let m = sql.bind(Param::Text(message_id.to_owned()));
    let second = inside(&mut sql);
    let range = users.filter(&mut sql, "user_id");
    sql.push(&format!(
        "(SELECT MAX(q.ends_at) {first}), note = {note} WHERE message_id = {m}{range} AND state IN {UNSENT} AND EXISTS (SELECT 1 {second})"
    ));
    sql.counting(Effect::Count(DEFERRED_COUNT))
}

/// After a campaign's attempts are inserted: skip the recipients among
/// `users` who reached today's hub-wide budget or their own
/// (trend-dependent) cap, record why, and count the rest against today's
/// attention.
pub(super) fn apply_fatigue(
    message_id: &str,
    priority: Priority,
    now: i64,
    attention: &AttentionConfig,
    users: &UserRange,
) -> Vec<Sql> {
    let cap = attention.cap_expression(priority, "g.score");
    let budget = (attention.daily_budget > 0).then_some(attention.daily_budget);
    if cap.is_none() && budget.is_none() {
        return Vec::new();
    }
    let today = now.div_euclid(86_400_000);
    let mut statements = Vec::new();

    let mut roll =
        Sql::new("INSERT INTO engagement (user_id, score, day, planned) SELECT DISTINCT user_id, ");
    let start = roll.bind(Param::Int(SCORE_START));
    let day = roll.bind(Param::Int(today));
    let m = roll.bind(Param::Text(message_id.to_owned()));
    let range = users.filter(&mut roll, "user_id");
    roll.push(&format!(
        "{start}, {day}, 0 FROM deliveries WHERE message_id = {m}{range} AND state IN {UNSENT} \
         ON CONFLICT (user_id) DO UPDATE SET day = excluded.day, planned = 0 WHERE engagement.day <> excluded.day"
    ));
    statements.push(roll);

    let mut skip = |limit: String, reason: String| {
        let mut sql = Sql::new(formatcp!(
            "UPDATE deliveries SET state = {SKIPPED}, note = "
        ));
        let note = sql.bind(Param::Text(reason));
        let m = sql.bind(Param::Text(message_id.to_owned()));
        let range = users.filter(&mut sql, "user_id");
        sql.push(&format!(
            "{note} WHERE message_id = {m}{range} AND state IN {UNSENT} AND user_id IN \
             (SELECT g.user_id FROM engagement g WHERE g.planned >= {limit})"
        ));
        statements.push(sql);
    };
    if let Some(budget) = budget {
        skip(
            budget.to_string(),
            format!("skipped: hub-wide daily attention budget of {budget} reached"),
        );
    }
    if let Some(cap) = cap {
        skip(
            cap,
            format!(
                "skipped: fatigue — daily cap for this person's falling open rate reached ({} priority)",
                priority.as_str()
            ),
        );
    }

    statements.push(record_skips(message_id, now, users));

    let mut spend =
        Sql::new("UPDATE engagement SET planned = planned + 1, score = score - score / ");
    let shift = spend.bind(Param::Int(SCORE_SEND_SHIFT));
    let m = spend.bind(Param::Text(message_id.to_owned()));
    let range = users.filter(&mut spend, "user_id");
    spend.push(&format!(
        "{shift} WHERE user_id IN (SELECT user_id FROM deliveries WHERE message_id = {m}{range} AND state IN {UNSENT})"
    ));
    statements.push(spend);
    statements
}

/// A `skipped` event for each person of `message_id` among
/// `users` whose attempts were skipped (state 5), once.
pub(super) fn record_skips(message_id: &str, now: i64, users: &UserRange) -> Sql {
    let mut record = Sql::new(
        "INSERT INTO events (message_id, user_id, kind, at, carrier_id, channel, region) SELECT message_id, user_id, ",
    );
    let kind = record.bind(Param::Int(EventKind::Skipped.number()));
    let at = record.bind(Param::Int(now));
    let m = record.bind(Param::Text(message_id.to_owned()));
    let range = users.filter(&mut record, "user_id");
    record.push(&format!(
        "{kind}, {at}, carrier_id, channel, '' FROM deliveries WHERE message_id = {m}{range} AND state = {SKIPPED} ON CONFLICT DO NOTHING"
    ));
    // The events count themselves (migration 0016).
    record
}

/// The plan in words, as `GetMessage` and `explain` show it.
pub(crate) fn describe(plan: &MessagePlan, estimate: Option<&str>) -> String {
    let mut text = plan.policy.to_string();
    if let Some(estimate) = estimate {
        text.push_str(&format!(" — {estimate}"));
    }
    if let Some(window) = &plan.window {
        let place = match plan.window_mode {
            WindowMode::HeldAtRelay => "held at the relay",
            WindowMode::AtCarrier => "held at the carrier",
        };
        text.push_str(&format!("; window {window} ({place})"));
    }
    if let Some(send_time) = &plan.send_time {
        text.push_str(&format!("; {send_time}"));
    }
    text.push_str(&format!("; expires {}", timestamp(plan.expires_at)));
    if plan.priority != Priority::Normal {
        text.push_str(&format!("; {} priority", plan.priority.as_str()));
    }
    text
}

/// Picks the candidate with the highest posterior mean open rate (Beta(1, 1)
/// prior, so a channel without data neither wins nor loses by default);
/// ties go to the earlier candidate. Returns the channel and the estimate in words.
pub(crate) fn choose_best(
    candidates: &[Channel],
    rates: &[(Channel, OpenCounts)],
) -> (Channel, String) {
    let rate_of = |channel: Channel| {
        rates
            .iter()
            .find(|(c, _)| *c == channel)
            .map(|(_, r)| *r)
            .unwrap_or_default()
    };
    let mean = |r: OpenCounts| (r.opened as f64 + 1.0) / (r.delivered as f64 + 2.0);
    let mut best = candidates[0];
    for channel in &candidates[1..] {
        if mean(rate_of(*channel)) > mean(rate_of(best)) {
            best = *channel;
        }
    }
    let words: Vec<String> = candidates
        .iter()
        .map(|channel| {
            let rate = rate_of(*channel);
            if rate.delivered == 0 {
                format!("{} no data", channel_name(Some(*channel)))
            } else {
                format!(
                    "{} {:.0}% of {} delivered opened",
                    channel_name(Some(*channel)),
                    100.0 * rate.opened as f64 / rate.delivered as f64,
                    rate.delivered
                )
            }
        })
        .collect();
    (
        best,
        format!("chose {}: {}", channel_name(Some(best)), words.join("; ")),
    )
}

pub(crate) use chukei_proto::clock::rfc3339 as timestamp;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_prefers_the_higher_posterior_and_breaks_ties_by_order() {
        let rates = [
            (
                Channel::Rcs,
                OpenCounts {
                    delivered: 100,
                    opened: 40,
                },
            ),
            (
                Channel::Sms,
                OpenCounts {
                    delivered: 100,
                    opened: 20,
                },
            ),
        ];
        let (best, words) = choose_best(&[Channel::Sms, Channel::Rcs], &rates);
        assert_eq!(best, Channel::Rcs);
        assert!(words.contains("RCS 40% of 100 delivered opened"));
        let (tie, _) = choose_best(&[Channel::Email, Channel::Sns], &[]);
        assert_eq!(tie, Channel::Email);
    }

    #[test]
    fn statements_number_their_binds() {
        let statements = insert_attempts(
            "m",
            &[ChannelChoice::Fixed(Some(Channel::Sms))],
            (5, 9),
            1,
            ("first", Lane::Bulk),
            |sql: &mut Sql| {
                let user = sql.bind(Param::Text("u".into()));
                sql.push(&format!(" FROM contracts c WHERE c.user_id = {user}"));
            },
        );
        assert_eq!(statements.len(), 1);
        assert!(
            statements[0]
                .text
                .contains("$1, c.user_id, c.carrier_id, $2, 0, $3, $4, $5, $6, $7")
        );
        assert!(statements[0].text.contains("c.user_id = $8"));
        assert_eq!(statements[0].params[6], Param::Int(Lane::Bulk as i64));
        // Planned at 1 to go at 5: the rows wait.
        assert_eq!(statements[0].params[2], Param::Int(WAITING));
    }
}
