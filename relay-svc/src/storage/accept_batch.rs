//! Targeted messages accepted in batches.
//!
//! Accepting a message on its own is a chain of statements in the writer's
//! turn — a savepoint, the message row, its attempts, its state, the
//! release — each a hand-off to the database's thread and back, one member
//! of the accepts' group after another (`group.rs`). Under load the turn
//! was busy with those hand-offs while the machine stood a third idle.
//!
//! So the plain targeted messages (named refs, a fixed order of channels;
//! no follow-up, winning bid, per-person channel or send time) do not each
//! join the group: they queue here, and one batch — a member of the group
//! like any other — writes every message queued by the time it has the
//! turn: one statement reads every ref's registration and contracts, one
//! inserts every message (already expanded, with its count), one inserts
//! every attempt. Each call is answered once the group's commit holds its
//! message, as before. A message this does not settle — a ref not
//! registered (the error names it), a batch that failed — goes back to its
//! caller, which accepts it on its own, so refusals and their wording stay
//! in one place (`messages.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::due_now::{DueNowSink, due_at, due_message};
use super::message_rows::{PRICE_TABLE_IN_FORCE, expanded_message_columns};
use super::messages::{Acceptance, Accepted};
use super::planning::{self, ChannelChoice, MessagePlan, PlanSteps};
use super::ref_cache::RefCache;
use super::states::{PENDING, WAITING};
use super::transfer::DueDelivery;
use super::transfer::EVERYONE_HANDED_OVER;
use super::{CountSteps, Lane, Param, Store, on_pool, stored_window_close, transaction_steps};
use crate::error::Result;
use crate::policy::AttentionConfig;
use crate::receipts::MessageEventKind;
use crate::targeting::{Channel, NewMessage, Target};

/// At most this many messages in one batch; more wait for the next.
const MOST_PER_BATCH: usize = 512;

/// Message rows per `INSERT` at most (about 40 binds each).
const MESSAGES_PER_STATEMENT: usize = 64;

/// Attempt rows per `INSERT`, and refs per read, at most.
const ROWS_PER_BATCH_STATEMENT: usize = 256;

/// `rows` in chunks of a power of two each, at most `most` (itself a power
/// of two), largest first: a batch of any size is a few statements whose
/// text was seen before. Each text is prepared on its first use and kept
/// (sqlx's cache, per connection); a statement per batch size would
/// prepare most batches' statements afresh and crowd the cache.
fn in_sizes_seen_before<T>(mut rows: Vec<T>, most: usize) -> Vec<Vec<T>> {
    debug_assert!(most.is_power_of_two());
    let mut chunks = Vec::new();
    while !rows.is_empty() {
        let size = most.min(1 << rows.len().ilog2());
        let rest = rows.split_off(size);
        chunks.push(std::mem::replace(&mut rows, rest));
    }
    chunks
}

/// One targeted message waiting for a batch.
pub(super) struct Job {
    pub message_id: String,
    pub fingerprint: String,
    pub message: NewMessage,
    pub plan: MessagePlan,
    pub description: String,
    pub now: i64,
    /// The first attempts' channels (stored numbers), one row each per recipient.
    channels: Vec<i64>,
    /// When the first attempts may go, and when a held window closes on them.
    timing: (i64, i64),
    pub attention: AttentionConfig,
    pub webhooks_listening: bool,
    answer: oneshot::Sender<Batched>,
}

/// What a batch did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Batched {
    /// Stored and planned, committed: `matched` people.
    Stored { matched: u64 },
    /// Its idempotency key was taken (before, or earlier in the batch).
    KeyTaken,
    /// Not settled here: to be accepted on its own.
    OnItsOwn,
}

impl Job {
    /// A job for `a`, and where its outcome will arrive, when `a` may be
    /// accepted in a batch: named refs, no winning bid, no follow-up, and
    /// every first attempt's channel and time fixed by the plan (not drawn
    /// or chosen per person).
    fn of(a: &Acceptance<'_>) -> Option<(Self, oneshot::Receiver<Batched>)> {
        let plain = matches!(a.message.target, Target::Refs(_))
            && a.terms.bid_id.is_none()
            && a.message.follow_up.is_none()
            && a.plan.send_time.is_none()
            && a.bandit.is_none();
        if !plain {
            return None;
        }
        let channels = planning::first_channels(&a.plan.policy, None)
            .into_iter()
            .map(|choice| match choice {
                ChannelChoice::Fixed(channel) => Some(Channel::number(channel)),
                ChannelChoice::MostUsed(_) => None,
            })
            .collect::<Option<Vec<i64>>>()?;
        let (answer, outcome) = oneshot::channel();
        let job = Self {
            message_id: a.message_id.to_owned(),
            fingerprint: a.fingerprint.to_owned(),
            message: a.message.clone(),
            plan: a.plan.clone(),
            description: a.description.clone(),
            now: a.now,
            channels,
            timing: a.plan.timing(a.now).unwrap_or((a.now, a.now)),
            attention: *a.attention,
            webhooks_listening: a.webhooks_listening,
            answer,
        };
        Some((job, outcome))
    }

    fn refs(&self) -> &[String] {
        match &self.message.target {
            Target::Refs(refs) => refs,
            _ => &[],
        }
    }
}

/// The messages waiting for a batch, and whether a batch writer is running.
#[derive(Debug, Default)]
pub(crate) struct AcceptQueue {
    state: std::sync::Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    jobs: Vec<Job>,
    writing: bool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl AcceptQueue {
    /// Queues `job`; true when no batch writer is running, so the caller
    /// starts one ([`AcceptQueue::writes_on`] is its loop condition).
    pub(super) fn push(&self, job: Job) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        state.jobs.push(job);
        !std::mem::replace(&mut state.writing, true)
    }

    /// Whether the batch writer goes on: something is queued. When nothing
    /// is, the writer stops here, and the next [`AcceptQueue::push`] starts one.
    pub(super) fn writes_on(&self) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        state.writing = !state.jobs.is_empty();
        state.writing
    }

    /// The next batch: the oldest waiting messages, at most [`MOST_PER_BATCH`].
    pub(super) fn take(&self) -> Vec<Job> {
        let mut state = self.state.lock().expect("not poisoned");
        let rest = state.jobs.len().saturating_sub(MOST_PER_BATCH);
        let mut batch = std::mem::take(&mut state.jobs);
        state.jobs = batch.split_off(batch.len() - rest);
        batch
    }
}

/// Answers each of `jobs` with its outcome (`OnItsOwn` for those without).
pub(super) fn answer(jobs: Vec<Job>, outcomes: &[Batched]) {
    for (index, job) in jobs.into_iter().enumerate() {
        let outcome = outcomes.get(index).copied().unwrap_or(Batched::OnItsOwn);
        // A caller that has gone away (a cancelled call) needs no answer:
        // its message, if stored, is found by its key.
        let _ = job.answer.send(outcome);
    }
}

/// Gives `due` (carrier, delivery) to `sink`, carrier by carrier.
fn hand_over(sink: &dyn DueNowSink, due: Vec<(String, DueDelivery)>) {
    let mut by_carrier: BTreeMap<String, Vec<DueDelivery>> = BTreeMap::new();
    for (carrier_id, delivery) in due {
        by_carrier.entry(carrier_id).or_default().push(delivery);
    }
    for (carrier_id, deliveries) in by_carrier {
        sink.due_now(&carrier_id, deliveries);
    }
}

impl Store {
    /// Accepts a plain targeted message `a` in a batch with the others
    /// waiting (`accept_batch.rs`), starting the batches' writer when none
    /// is running; `None` when it is to be accepted on its own (not such a
    /// message, a ref not registered, a batch that failed).
    pub(super) async fn accept_in_batch(&self, a: &Acceptance<'_>) -> Option<Accepted> {
        let (job, outcome) = Job::of(a)?;
        let sink = self.due_now_sink();
        let dispatched = sink.is_some();
        on_pool!(self, pool, groups => {
            if groups.batches.push(job) {
                let (pool, groups) = (pool.clone(), groups.clone());
                tokio::spawn(async move {
                    while groups.batches.writes_on() {
                        let joined = groups.accepts.join(&pool).await;
                        let jobs = groups.batches.take();
                        let failed = match joined {
                            Ok(mut batch) => match batch.accept_batch(&jobs, sink.is_some(), &groups.refs).await {
                                Ok((outcomes, due)) => {
                                    // Answered once the group's commit holds them,
                                    // their due attempts already with the
                                    // dispatchers; the next batch gathers meanwhile.
                                    let sink = sink.clone();
                                    tokio::spawn(async move {
                                        match batch.commit().await {
                                            Ok(()) => {
                                                if let Some(sink) = sink {
                                                    hand_over(sink.as_ref(), due);
                                                }
                                                answer(jobs, &outcomes);
                                            }
                                            Err(error) => {
                                                tracing::warn!(error = %error, messages = jobs.len(), "a batch of targeted accepts did not commit; each is accepted on its own");
                                                answer(jobs, &[]);
                                            }
                                        }
                                    });
                                    continue;
                                }
                                Err(error) => error,
                            },
                            Err(error) => error,
                        };
                        tracing::warn!(error = %failed, messages = jobs.len(), "a batch of targeted accepts failed; each is accepted on its own");
                        answer(jobs, &[]);
                    }
                });
            }
        });
        match outcome.await {
            Ok(Batched::Stored { matched }) => Some(Accepted::Stored {
                matched: Some(matched),
                dispatched,
            }),
            Ok(Batched::KeyTaken) => Some(Accepted::KeyTaken),
            Ok(Batched::OnItsOwn) | Err(_) => None,
        }
    }
}

/// One `INSERT INTO table (columns…) VALUES (…), (…)` of every row in
/// `rows`, each with the same columns in the same order. Its binds are
/// SQLite's anonymous `?` (PostgreSQL's `$n`), which SQLite numbers as it
/// parses: `$n` names (as `planning::Sql` writes them) are each looked up
/// among the names seen before, and an `INSERT` of 64 rows of 40 named
/// binds took 6.5 ms in the relay (median), against 0.56 ms with `?`.
fn insert_rows<DB>(table: &str, rows: Vec<Vec<(&str, Param)>>) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> bool: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<i64>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<String>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let columns: Vec<&str> = rows
        .first()
        .map(|row| row.iter().map(|(column, _)| *column).collect())
        .unwrap_or_default();
    let mut query =
        sqlx::QueryBuilder::new(format!("INSERT INTO {table} ({}) ", columns.join(", ")));
    query.push_values(rows, |mut values, row| {
        debug_assert!(
            row.iter()
                .map(|(column, _)| *column)
                .eq(columns.iter().copied())
        );
        for (_, param) in row {
            match param {
                Param::Text(value) => values.push_bind(value),
                Param::Int(value) => values.push_bind(value),
                Param::Bool(value) => values.push_bind(value),
                Param::OptInt(value) => values.push_bind(value),
                Param::OptText(value) => values.push_bind(value),
            };
        }
    });
    query
}

/// Per enterprise, each registered ref's contracts (user, carrier,
/// primary); a registered ref with no contract has none.
type Resolved = HashMap<String, HashMap<String, Vec<(String, String, bool)>>>;

transaction_steps! {
    /// What a batch of targeted accepts does inside its (group's) transaction.
    pub(super) trait BatchSteps {
        /// Stores and plans `jobs` together; each one's outcome, in order,
        /// and (`want_due`) the first attempts due at once with their
        /// carriers. The batch's statements are its member's in the group:
        /// an error rolls back all of them and nothing else.
        async fn accept_batch(&mut self, jobs: &[Job], want_due: bool, cache: &RefCache) -> Result<(Vec<Batched>, Vec<(String, DueDelivery)>)> {
            let resolved = self.resolve_refs(jobs, cache).await?;
            let mut outcomes = vec![Batched::OnItsOwn; jobs.len()];
            let mut rows = Vec::new();
            let mut recipients: Vec<Vec<(&str, &str)>> = vec![Vec::new(); jobs.len()];
            for (index, job) in jobs.iter().enumerate() {
                let Some(planned) = recipients_of(job, &resolved) else {
                    continue; // a ref not registered: refused on its own
                };
                let matched = planned.iter().map(|(user, _)| *user).collect::<HashSet<_>>().len();
                rows.push(expanded_message_columns(
                    &job.message_id,
                    &job.fingerprint,
                    &job.message,
                    &job.plan,
                    &job.description,
                    matched as u64,
                ));
                outcomes[index] = Batched::Stored { matched: matched as u64 };
                recipients[index] = planned;
            }
            // The messages, already expanded, with the price table in force;
            // a key taken leaves its row out.
            let price_table: Option<i64> = sqlx::query_scalar(PRICE_TABLE_IN_FORCE)
                .fetch_one(&mut *self)
                .await?;
            let mut stored = HashSet::new();
            for chunk in in_sizes_seen_before(rows, MESSAGES_PER_STATEMENT) {
                let rows = chunk.into_iter().map(|mut row| {
                    row.push(("price_table", Param::OptInt(price_table)));
                    row
                });
                let mut query = insert_rows("messages", rows.collect());
                query.push(" ON CONFLICT DO NOTHING RETURNING id");
                let ids: Vec<String> = query.build_query_scalar().fetch_all(&mut *self).await?;
                stored.extend(ids);
            }
            for (index, job) in jobs.iter().enumerate() {
                if matches!(outcomes[index], Batched::Stored { .. }) && !stored.contains(&job.message_id) {
                    outcomes[index] = Batched::KeyTaken;
                    recipients[index].clear();
                }
            }
            let due = self.insert_first_attempts(jobs, &recipients, want_due).await?;
            let stored: Vec<&Job> = jobs.iter().filter(|job| stored.contains(&job.message_id)).collect();
            self.after_accepting(&stored).await?;
            Ok((outcomes, due))
        }

        /// Every ref of `jobs` with its user and contracts: from `cache`
        /// while the registries are at the version it was read at, the
        /// rest in one statement per enterprise (per 1,000 refs).
        async fn resolve_refs(&mut self, jobs: &[Job], cache: &RefCache) -> Result<Resolved> {
            let mut refs: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
            for job in jobs {
                let of = refs.entry(job.plan.enterprise_id.as_str()).or_default();
                of.extend(job.refs().iter().map(String::as_str));
            }
            // First, so what is read below is at least as new.
            let version: i64 = sqlx::query_scalar("SELECT n FROM registry_version")
                .fetch_one(&mut *self)
                .await?;
            let mut resolved = Resolved::new();
            for (enterprise_id, refs) in refs {
                let of_enterprise = resolved.entry(enterprise_id.to_owned()).or_default();
                let mut unknown = Vec::new();
                for user_ref in refs {
                    match cache.get(version, enterprise_id, user_ref) {
                        Some(contracts) => {
                            of_enterprise.insert(user_ref.to_owned(), contracts);
                        }
                        None => unknown.push(user_ref),
                    }
                }
                for chunk in in_sizes_seen_before(unknown, ROWS_PER_BATCH_STATEMENT) {
                    let mut query = sqlx::QueryBuilder::new(
                        "SELECT r.user_ref, c.user_id, c.carrier_id, c.is_primary
                         FROM registrations r LEFT JOIN contracts c ON c.user_id = r.user_id
                         WHERE r.enterprise_id = ",
                    );
                    query.push_bind(enterprise_id).push(" AND r.user_ref IN (");
                    let mut list = query.separated(", ");
                    for user_ref in &chunk {
                        list.push_bind(*user_ref);
                    }
                    query.push(")");
                    type Row = (String, Option<String>, Option<String>, Option<bool>);
                    let rows: Vec<Row> = query.build_query_as().fetch_all(&mut *self).await?;
                    for (user_ref, user_id, carrier_id, primary) in rows {
                        let contracts = of_enterprise.entry(user_ref).or_default();
                        if let (Some(user_id), Some(carrier_id)) = (user_id, carrier_id) {
                            contracts.push((user_id, carrier_id, primary.unwrap_or(false)));
                        }
                    }
                    for user_ref in chunk {
                        if let Some(contracts) = of_enterprise.get(user_ref) {
                            cache.put(version, enterprise_id, user_ref, contracts);
                        }
                    }
                }
            }
            Ok(resolved)
        }

        /// The first attempts of every stored message, in the priority lane:
        /// one row per recipient, carrier and channel, 1,000 rows a statement;
        /// with `want_due`, those a due read would return now, as it would
        /// (their ids from the `INSERT`), with their carriers.
        async fn insert_first_attempts(
            &mut self,
            jobs: &[Job],
            recipients: &[Vec<(&str, &str)>],
            want_due: bool,
        ) -> Result<Vec<(String, DueDelivery)>> {
            let mut rows = Vec::new();
            // Each message due at once, with what its deliveries share.
            let mut due_messages: HashMap<&str, Arc<super::transfer::DueMessage>> = HashMap::new();
            for (job, recipients) in jobs.iter().zip(recipients) {
                let (not_before, window_close) = job.timing;
                let state = if not_before > job.now { WAITING } else { PENDING };
                let due_now = due_at(not_before, stored_window_close(window_close), job.plan.expires_at, job.now);
                if want_due && due_now && !recipients.is_empty() {
                    due_messages.insert(&job.message_id, Arc::new(due_message(&job.message, &job.plan)));
                }
                for &channel in &job.channels {
                    for (user_id, carrier_id) in recipients {
                        rows.push((job.message_id.as_str(), *user_id, *carrier_id, channel, state, not_before, window_close));
                    }
                }
            }
            let mut due = Vec::new();
            for chunk in in_sizes_seen_before(rows, ROWS_PER_BATCH_STATEMENT) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO deliveries (message_id, user_id, carrier_id, channel, attempt, state, not_before, window_close, reason, lane) ",
                );
                query.push_values(&chunk, |mut row, (message_id, user_id, carrier_id, channel, state, not_before, window_close)| {
                    row.push_bind(*message_id)
                        .push_bind(*user_id)
                        .push_bind(*carrier_id)
                        .push_bind(*channel)
                        .push_bind(0_i64)
                        .push_bind(*state)
                        .push_bind(*not_before)
                        .push_bind(stored_window_close(*window_close))
                        .push_bind("")
                        .push_bind(Lane::Priority as i64);
                });
                query.push(" ON CONFLICT DO NOTHING");
                if due_messages.is_empty() {
                    query.build().execute(&mut *self).await?;
                    continue;
                }
                query.push(" RETURNING id, message_id, user_id, carrier_id, channel, not_before");
                type Inserted = (i64, String, String, String, i64, i64);
                let inserted: Vec<Inserted> = query.build_query_as().fetch_all(&mut *self).await?;
                for (id, message_id, user_id, carrier_id, channel, not_before) in inserted {
                    let Some(message) = due_messages.get(message_id.as_str()) else {
                        continue;
                    };
                    let delivery = DueDelivery {
                        id,
                        message_id,
                        user_id,
                        channel: Channel::from_number(channel),
                        not_before,
                        message: message.clone(),
                    };
                    due.push((carrier_id, delivery));
                }
            }
            Ok(due)
        }

        /// What follows a stored message in its transaction: its own events
        /// for webhooks (accepted, expanded: one statement each for the
        /// batch, at the batch's time) and quiet periods around it (its own
        /// statements, when the hub holds them).
        async fn after_accepting(&mut self, stored: &[&Job]) -> Result<()> {
            let Some(latest) = stored.iter().map(|job| job.now).max() else {
                return Ok(());
            };
            if stored.iter().any(|job| job.webhooks_listening) {
                let ids: Vec<&str> = stored.iter().map(|job| job.message_id.as_str()).collect();
                for (kind, only) in [
                    (MessageEventKind::Accepted, "TRUE"),
                    (MessageEventKind::Expanded, "TRUE"),
                    (MessageEventKind::HandedOver, EVERYONE_HANDED_OVER),
                ] {
                    self.record_message_events(&ids, kind, only, latest).await?;
                }
            }
            for job in stored {
                let quiet = planning::open_quiet_periods(&job.message_id, job.timing.0, job.now, &job.attention);
                self.execute_all(&job.message_id, quiet).await?;
            }
            Ok(())
        }
    }
}

/// Whom `job` reaches — (user, carrier) once each, by its refs' contracts
/// (the primary, or every one for all carriers) — or `None` when one of
/// its refs is not registered with its enterprise.
fn recipients_of<'a>(job: &Job, resolved: &'a Resolved) -> Option<Vec<(&'a str, &'a str)>> {
    let registered = resolved.get(&job.plan.enterprise_id)?;
    let mut recipients = Vec::new();
    let mut seen = HashSet::new();
    for user_ref in job.refs() {
        let contracts = registered.get(user_ref)?;
        for (user_id, carrier_id, primary) in contracts {
            if (*primary || job.plan.all_carriers) && seen.insert((user_id, carrier_id)) {
                recipients.push((user_id.as_str(), carrier_id.as_str()));
            }
        }
    }
    Some(recipients)
}

#[cfg(test)]
mod tests {
    use super::in_sizes_seen_before;

    fn sizes(rows: usize, most: usize) -> Vec<usize> {
        in_sizes_seen_before((0..rows).collect(), most)
            .iter()
            .map(Vec::len)
            .collect()
    }

    #[test]
    fn batches_are_cut_in_powers_of_two_in_order() {
        assert_eq!(sizes(0, 64), Vec::<usize>::new());
        assert_eq!(sizes(1, 64), [1]);
        assert_eq!(sizes(53, 64), [32, 16, 4, 1]);
        assert_eq!(sizes(200, 64), [64, 64, 64, 8]);
        let rows: Vec<usize> = in_sizes_seen_before((0..53).collect(), 64)
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(
            rows,
            (0..53).collect::<Vec<_>>(),
            "every row once, in order"
        );
    }
}
