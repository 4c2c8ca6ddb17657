//! What the gateways (`crate::gateways`) keep: the ids a network gave each
//! part of a delivery, and what it reported about them since. A delivery
//! handed over is `pushed` in the same transaction that keeps its ids; a
//! report moves it on (delivered once every part is, failed at the first
//! failed part, opened on a read) through the same state changes a
//! terminal's events make. A report about an id not yet kept waits in
//! `gateway_orphans` until the id is.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{QueryBuilder, Sqlite};

use super::receipts::report_closed;
use super::states::{State, apply_events, change_states, rows_by_seq};
use super::{ROWS_PER_STATEMENT, Result, Store};
use crate::model::{
    Handed, NetworkReport, Outcome, Outgoing, ReceiptKind, TerminalEvent, TerminalEventKind,
    id_forms,
};

/// A part as kept: which delivery, and what the network said of it so far.
#[derive(sqlx::FromRow)]
struct PartRow {
    external_id: String,
    message_id: String,
    delivery_id: i64,
    outcome: i64,
}

/// One part of a delivery the network took: the delivery, its place among
/// the parts, and the id the network gave it (normalised).
type Part<'a> = (&'a Outgoing, usize, usize, String);

/// Slots (row → indexes) a change applies to.
type Slots = BTreeMap<i64, HashSet<u32>>;

/// What a batch of answers asks of the store.
#[derive(Default)]
struct Answers<'a> {
    pushed: Slots,
    failed: Slots,
    parts: Vec<Part<'a>>,
    /// Taken and delivered in one answer: reported delivered once kept.
    delivered: Vec<NetworkReport>,
    errors: HashMap<(&'a str, u64), &'a str>,
}

impl<'a> Answers<'a> {
    fn of(answers: &'a [(Outgoing, Handed)], now: i64) -> Self {
        let mut sorted = Self::default();
        for (outgoing, handed) in answers {
            let slot = outgoing.slot;
            match handed {
                Handed::Accepted(ids) | Handed::Delivered(ids) => {
                    if matches!(handed, Handed::Delivered(_)) {
                        sorted.delivered.extend(ids.iter().map(|id| NetworkReport {
                            external_id: id.clone(),
                            outcome: Outcome::Delivered,
                            error: String::new(),
                            at: now,
                        }));
                    }
                    sorted
                        .pushed
                        .entry(slot.row)
                        .or_default()
                        .insert(slot.index);
                    for (part, id) in ids.iter().enumerate() {
                        let id = id_forms(id).remove(0);
                        sorted.parts.push((outgoing, part, ids.len(), id));
                    }
                }
                Handed::Refused(error) => {
                    sorted
                        .failed
                        .entry(slot.row)
                        .or_default()
                        .insert(slot.index);
                    let key = (outgoing.message_id.as_str(), outgoing.delivery_id);
                    sorted.errors.insert(key, error);
                }
                Handed::Later(_) => {}
            }
        }
        sorted
    }
}

impl Store {
    /// Records what `gateway` answered for deliveries handed to it: the
    /// accepted are pushed and their parts' ids kept, the refused are
    /// failed (a FAILED receipt each); those put off stay held. Reports that
    /// came before their ids were kept are applied now. Returns how many
    /// receipts were queued.
    pub async fn record_handed(
        &self,
        gateway: &str,
        answers: &[(Outgoing, Handed)],
        now: i64,
    ) -> Result<usize> {
        let answers = Answers::of(answers, now);
        if answers.pushed.is_empty() && answers.failed.is_empty() {
            return Ok(0);
        }
        let (mut tx, _turn) = self.begin_write().await?;
        keep_ids(&mut tx, gateway, &answers.parts, now).await?;
        let mut queued = move_handed(&mut tx, gateway, &answers, now).await?;
        let mut early = take_early_reports(&mut tx, gateway, &answers.parts).await?;
        early.extend(answers.delivered);
        if !early.is_empty() {
            early.sort_by_key(|s| s.outcome);
            queued += apply_reports(&mut tx, gateway, &early).await?;
        }
        tx.commit().await?;
        Ok(queued)
    }

    /// Stores reports from `gateway`'s network and moves their deliveries
    /// on. Returns how many receipts were queued.
    pub async fn apply_gateway_reports(
        &self,
        gateway: &str,
        reports: &[NetworkReport],
        now: i64,
    ) -> Result<usize> {
        let reports: Vec<NetworkReport> = reports
            .iter()
            .map(|r| NetworkReport {
                at: if r.at > 0 { r.at } else { now },
                ..r.clone()
            })
            .collect();
        let (mut tx, _turn) = self.begin_write().await?;
        let queued = apply_reports(&mut tx, gateway, &reports).await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// The id `gateway` gave delivery `delivery_id` (its first part's).
    pub async fn gateway_id_of(&self, gateway: &str, delivery_id: u64) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT external_id FROM gateway_parts WHERE gateway = $1 AND delivery_id = $2
             ORDER BY part LIMIT 1",
        )
        .bind(gateway)
        .bind(delivery_id as i64)
        .fetch_optional(&self.pool)
        .await
    }
}

type Tx<'t> = sqlx::Transaction<'t, Sqlite>;

/// Keeps the ids the network gave each part.
async fn keep_ids(tx: &mut Tx<'_>, gateway: &str, parts: &[Part<'_>], now: i64) -> Result<()> {
    for chunk in parts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO gateway_parts (gateway, external_id, message_id, delivery_id, part, parts, submitted_at) ",
        );
        query.push_values(chunk, |mut row, (outgoing, part, parts, id)| {
            row.push_bind(gateway)
                .push_bind(id)
                .push_bind(&outgoing.message_id)
                .push_bind(outgoing.delivery_id as i64)
                .push_bind(*part as i64)
                .push_bind(*parts as i64)
                .push_bind(now);
        });
        // An SMSC may reuse an id long after: the newest delivery has it.
        query.push(
            " ON CONFLICT (gateway, external_id) DO UPDATE SET message_id = excluded.message_id, \
             delivery_id = excluded.delivery_id, part = excluded.part, parts = excluded.parts, \
             outcome = 0, error = '', submitted_at = excluded.submitted_at",
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Held deliveries the network took become pushed, those it refused
/// failed (a FAILED receipt each, the refusals named in the log by kind).
async fn move_handed(
    tx: &mut Tx<'_>,
    gateway: &str,
    answers: &Answers<'_>,
    now: i64,
) -> Result<usize> {
    let mut slots = answers.pushed.clone();
    for (row, indexes) in &answers.failed {
        slots.entry(*row).or_default().extend(indexes);
    }
    let rows = rows_by_seq(tx, &slots).await?;
    let in_set =
        |set: &Slots, row: i64, index: u32| set.get(&row).is_some_and(|s| s.contains(&index));
    let moved = change_states(tx, rows, |slot, _, state| match state {
        State::Held if in_set(&answers.pushed, slot.row, slot.index) => Some(State::Pushed),
        State::Held if in_set(&answers.failed, slot.row, slot.index) => Some(State::Failed),
        _ => None,
    })
    .await?;
    let refused: Vec<_> = moved
        .into_iter()
        .filter(|m| m.to == State::Failed)
        .collect();
    let mut why: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &refused {
        let key = (m.message_id.as_str(), m.delivery_id);
        *why.entry(answers.errors.get(&key).copied().unwrap_or_default())
            .or_default() += 1;
    }
    for (error, deliveries) in why {
        tracing::info!(gateway, error, deliveries, "the network refused deliveries");
    }
    report_closed(tx, refused, ReceiptKind::Failed, now).await
}

/// Reports that came before these parts' ids were kept, in whichever base,
/// taken out of `gateway_orphans`.
async fn take_early_reports(
    tx: &mut Tx<'_>,
    gateway: &str,
    parts: &[Part<'_>],
) -> Result<Vec<NetworkReport>> {
    let forms: Vec<String> = parts.iter().flat_map(|(.., id)| id_forms(id)).collect();
    let ids: Vec<&str> = forms.iter().map(String::as_str).collect();
    let mut early = Vec::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new("DELETE FROM gateway_orphans WHERE gateway = ");
        query.push_bind(gateway).push(" AND external_id");
        super::in_list(&mut query, chunk.iter().copied());
        query.push(" RETURNING external_id, outcome, error, at");
        let rows: Vec<(String, i64, String, i64)> =
            query.build_query_as().fetch_all(&mut **tx).await?;
        early.extend(
            rows.into_iter()
                .filter_map(|(external_id, outcome, error, at)| {
                    Some(NetworkReport {
                        external_id,
                        outcome: outcome_of(outcome)?,
                        error,
                        at,
                    })
                }),
        );
    }
    Ok(early)
}

fn outcome_of(number: i64) -> Option<Outcome> {
    match number {
        1 => Some(Outcome::Delivered),
        2 => Some(Outcome::Failed),
        3 => Some(Outcome::Read),
        4 => Some(Outcome::Bounced),
        _ => None,
    }
}

/// Applies reports inside `tx`: each part's outcome kept (a part moves
/// forward only, and a failure is final), the reports about ids not kept
/// yet set aside, the deliveries moved on.
async fn apply_reports(tx: &mut Tx<'_>, gateway: &str, reports: &[NetworkReport]) -> Result<usize> {
    let mut kept = parts_named(tx, gateway, reports).await?;
    let mut orphans: Vec<&NetworkReport> = Vec::new();
    let mut updates: Vec<(String, i64, &str)> = Vec::new();
    let mut touched: Vec<(&NetworkReport, String, i64)> = Vec::new();
    for report in reports {
        // The id as given first; the other base only when that is unknown.
        let forms = id_forms(&report.external_id);
        let Some(part) = forms
            .iter()
            .find(|form| kept.contains_key(*form))
            .and_then(|key| kept.get_mut(key))
        else {
            orphans.push(report);
            continue;
        };
        // Kept as 0 submitted, 1 delivered, 2 failed, 3 read: a bounce is a
        // failure that may follow a delivery.
        let outcome = match report.outcome {
            Outcome::Bounced => 2,
            other => other as i64,
        };
        let moves = match (part.outcome, report.outcome) {
            (2, _) => false,
            (now, Outcome::Failed) => now == 0,
            (now, Outcome::Bounced) => now != 2,
            (now, _) => outcome > now,
        };
        if moves {
            part.outcome = outcome;
            updates.push((part.external_id.clone(), outcome, &report.error));
        }
        touched.push((report, part.message_id.clone(), part.delivery_id));
    }
    set_outcomes(tx, gateway, &updates).await?;
    set_aside(tx, gateway, &orphans).await?;
    let open = parts_still_open(tx, gateway, &touched).await?;
    let events: Vec<TerminalEvent> = touched
        .into_iter()
        .filter_map(|(report, message_id, delivery_id)| {
            let kind = match report.outcome {
                // Delivered once all its parts are.
                Outcome::Delivered if open.contains(&(message_id.clone(), delivery_id)) => {
                    return None;
                }
                Outcome::Delivered => TerminalEventKind::Delivered,
                Outcome::Read => TerminalEventKind::Read,
                Outcome::Failed => TerminalEventKind::Failed,
                Outcome::Bounced => TerminalEventKind::Bounced,
            };
            Some(TerminalEvent {
                delivery_id: delivery_id as u64,
                message_id,
                kind,
                at: report.at,
                region: String::new(),
                trace_parent: String::new(),
            })
        })
        .collect();
    apply_events(tx, &events).await
}

/// The kept parts any form of the reports' ids names, by id.
async fn parts_named(
    tx: &mut Tx<'_>,
    gateway: &str,
    reports: &[NetworkReport],
) -> Result<HashMap<String, PartRow>> {
    let forms: Vec<String> = reports
        .iter()
        .flat_map(|r| id_forms(&r.external_id))
        .collect();
    let mut kept = HashMap::new();
    for chunk in forms.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "SELECT external_id, message_id, delivery_id, outcome FROM gateway_parts WHERE gateway = ",
        );
        query.push_bind(gateway).push(" AND external_id");
        super::in_list(&mut query, chunk.iter().map(String::as_str));
        for row in query
            .build_query_as::<PartRow>()
            .fetch_all(&mut **tx)
            .await?
        {
            kept.insert(row.external_id.clone(), row);
        }
    }
    Ok(kept)
}

async fn set_outcomes(
    tx: &mut Tx<'_>,
    gateway: &str,
    updates: &[(String, i64, &str)],
) -> Result<()> {
    for chunk in updates.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "UPDATE gateway_parts SET outcome = v.column2, error = v.column3 FROM (",
        );
        query.push_values(chunk, |mut row, (id, outcome, error)| {
            row.push_bind(id).push_bind(*outcome).push_bind(*error);
        });
        query.push(") AS v WHERE gateway_parts.gateway = ");
        query
            .push_bind(gateway)
            .push(" AND gateway_parts.external_id = v.column1");
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Reports about ids not kept (yet) wait in `gateway_orphans`; those for
/// ids never kept (a submit whose answer was lost in a crash, then handed
/// again under another id) are kept a day.
async fn set_aside(tx: &mut Tx<'_>, gateway: &str, orphans: &[&NetworkReport]) -> Result<()> {
    for chunk in orphans.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO gateway_orphans (gateway, external_id, outcome, error, at) ",
        );
        query.push_values(chunk, |mut row, report| {
            row.push_bind(gateway)
                .push_bind(id_forms(&report.external_id).remove(0))
                .push_bind(report.outcome as i64)
                .push_bind(&report.error)
                .push_bind(report.at);
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut **tx).await?;
    }
    if let Some(oldest) = orphans.iter().map(|o| o.at).min() {
        sqlx::query("DELETE FROM gateway_orphans WHERE at < $1")
            .bind(oldest - 86_400_000)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Of the deliveries reported delivered, those with a part not delivered yet.
async fn parts_still_open(
    tx: &mut Tx<'_>,
    gateway: &str,
    touched: &[(&NetworkReport, String, i64)],
) -> Result<HashSet<(String, i64)>> {
    let delivered: Vec<(&str, i64)> = touched
        .iter()
        .filter(|(r, ..)| r.outcome == Outcome::Delivered)
        .map(|(_, m, d)| (m.as_str(), *d))
        .collect();
    let mut open = HashSet::new();
    for chunk in delivered.chunks(ROWS_PER_STATEMENT) {
        let mut query =
            QueryBuilder::new("SELECT p.message_id, p.delivery_id FROM gateway_parts p JOIN (");
        query.push_values(chunk, |mut row, (message_id, delivery_id)| {
            row.push_bind(*message_id).push_bind(*delivery_id);
        });
        query.push(
            ") AS v ON p.message_id = v.column1 AND p.delivery_id = v.column2 WHERE p.gateway = ",
        );
        query
            .push_bind(gateway)
            .push(" AND p.outcome NOT IN (1, 3)");
        let rows: Vec<(String, i64)> = query.build_query_as().fetch_all(&mut **tx).await?;
        open.extend(rows);
    }
    Ok(open)
}
