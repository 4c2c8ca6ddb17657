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
use crate::gateways::{Handed, Outcome, Report, id_forms};
use crate::model::{Outgoing, ReceiptKind, TerminalEvent, TerminalEventKind};

/// A part as kept: which delivery, and what the network said of it so far.
#[derive(sqlx::FromRow)]
struct PartRow {
    external_id: String,
    message_id: String,
    delivery_id: i64,
    outcome: i64,
}

/// A report as applied: the id as the network gave it, and what it says.
struct Said {
    external_id: String,
    outcome: Outcome,
    error: String,
    at: i64,
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
        let mut pushed: BTreeMap<i64, HashSet<u32>> = BTreeMap::new();
        let mut failed: BTreeMap<i64, HashSet<u32>> = BTreeMap::new();
        let mut parts: Vec<(&Outgoing, usize, usize, String)> = Vec::new();
        // Taken and delivered in one answer: reported delivered once kept.
        let mut delivered: Vec<Said> = Vec::new();
        let mut errors: HashMap<(String, u64), &str> = HashMap::new();
        for (outgoing, handed) in answers {
            let slot = outgoing.slot;
            match handed {
                Handed::Accepted(ids) | Handed::Delivered(ids) => {
                    if matches!(handed, Handed::Delivered(_)) {
                        delivered.extend(ids.iter().map(|id| Said {
                            external_id: id.clone(),
                            outcome: Outcome::Delivered,
                            error: String::new(),
                            at: now,
                        }));
                    }
                    pushed.entry(slot.row).or_default().insert(slot.index);
                    for (part, id) in ids.iter().enumerate() {
                        parts.push((outgoing, part, ids.len(), id_forms(id).remove(0)));
                    }
                }
                Handed::Refused(error) => {
                    failed.entry(slot.row).or_default().insert(slot.index);
                    errors.insert((outgoing.message_id.clone(), outgoing.delivery_id), error);
                }
                Handed::Later(_) => {}
            }
        }
        if pushed.is_empty() && failed.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
            query.build().execute(&mut *tx).await?;
        }
        let mut slots = pushed.clone();
        for (row, indexes) in &failed {
            slots.entry(*row).or_default().extend(indexes);
        }
        let rows = rows_by_seq(&mut tx, &slots).await?;
        let in_set = |set: &BTreeMap<i64, HashSet<u32>>, row: i64, index: u32| {
            set.get(&row).is_some_and(|s| s.contains(&index))
        };
        let moved = change_states(&mut tx, rows, |slot, _, state| {
            if state != State::Held {
                None
            } else if in_set(&pushed, slot.row, slot.index) {
                Some(State::Pushed)
            } else if in_set(&failed, slot.row, slot.index) {
                Some(State::Failed)
            } else {
                None
            }
        })
        .await?;
        let refused: Vec<_> = moved
            .into_iter()
            .filter(|m| m.to == State::Failed)
            .collect();
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &refused {
            let error = errors
                .get(&(m.message_id.clone(), m.delivery_id))
                .copied()
                .unwrap_or_default();
            *why.entry(error).or_default() += 1;
        }
        for (error, deliveries) in why {
            tracing::info!(gateway, error, deliveries, "the network refused deliveries");
        }
        let mut queued = report_closed(&mut tx, refused, ReceiptKind::Failed, now).await?;

        // Reports that came before these ids were kept, in whichever base.
        let forms: Vec<String> = parts.iter().flat_map(|(.., id)| id_forms(id)).collect();
        let ids: Vec<&str> = forms.iter().map(String::as_str).collect();
        let mut early: Vec<Said> = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new("DELETE FROM gateway_orphans WHERE gateway = ");
            query.push_bind(gateway).push(" AND external_id");
            super::in_list(&mut query, chunk.iter().copied());
            query.push(" RETURNING external_id, outcome, error, at");
            let rows: Vec<(String, i64, String, i64)> =
                query.build_query_as().fetch_all(&mut *tx).await?;
            early.extend(
                rows.into_iter()
                    .filter_map(|(external_id, outcome, error, at)| {
                        Some(Said {
                            external_id,
                            outcome: outcome_of(outcome)?,
                            error,
                            at,
                        })
                    }),
            );
        }
        early.extend(delivered);
        if !early.is_empty() {
            early.sort_by_key(|s| s.outcome);
            queued += apply_said(&mut tx, gateway, &early).await?;
        }
        tx.commit().await?;
        Ok(queued)
    }

    /// Stores reports from `gateway`'s network and moves their deliveries
    /// on. Returns how many receipts were queued.
    pub async fn apply_gateway_reports(
        &self,
        gateway: &str,
        reports: &[Report],
        now: i64,
    ) -> Result<usize> {
        let said: Vec<Said> = reports
            .iter()
            .map(|r| Said {
                external_id: r.external_id.clone(),
                outcome: r.outcome,
                error: r.error.clone(),
                at: if r.at > 0 { r.at } else { now },
            })
            .collect();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let queued = apply_said(&mut tx, gateway, &said).await?;
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
/// forward only, and a failure is final), the deliveries moved on, the
/// reports about ids not kept yet set aside.
async fn apply_said(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    gateway: &str,
    said: &[Said],
) -> Result<usize> {
    // Every form of every id, looked up at once.
    let forms: Vec<Vec<String>> = said.iter().map(|s| id_forms(&s.external_id)).collect();
    let all: Vec<&str> = forms.iter().flatten().map(String::as_str).collect();
    let mut kept: HashMap<String, PartRow> = HashMap::new();
    for chunk in all.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "SELECT external_id, message_id, delivery_id, outcome FROM gateway_parts WHERE gateway = ",
        );
        query.push_bind(gateway).push(" AND external_id");
        super::in_list(&mut query, chunk.iter().copied());
        for row in query
            .build_query_as::<PartRow>()
            .fetch_all(&mut **tx)
            .await?
        {
            kept.insert(row.external_id.clone(), row);
        }
    }
    let mut orphans: Vec<&Said> = Vec::new();
    let mut updates: Vec<(String, i64, &str)> = Vec::new();
    let mut touched: Vec<(&Said, String, i64)> = Vec::new();
    for (report, forms) in said.iter().zip(&forms) {
        // The id as given first; the other base only when that is unknown.
        let Some(key) = forms.iter().find(|form| kept.contains_key(*form)) else {
            orphans.push(report);
            continue;
        };
        let Some(part) = kept.get_mut(key) else {
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
    if !orphans.is_empty() {
        // Reports for ids never kept (a submit whose answer was lost in a
        // crash, then handed again under another id) are kept a day.
        let oldest = orphans.iter().map(|o| o.at).min().unwrap_or_default();
        sqlx::query("DELETE FROM gateway_orphans WHERE at < $1")
            .bind(oldest - 86_400_000)
            .execute(&mut **tx)
            .await?;
    }

    // A delivery is delivered once all its parts are: read the parts of
    // the deliveries reported delivered.
    let delivered: Vec<(&str, i64)> = touched
        .iter()
        .filter(|(r, ..)| r.outcome == Outcome::Delivered)
        .map(|(_, m, d)| (m.as_str(), *d))
        .collect();
    let mut open_parts: HashSet<(String, i64)> = HashSet::new();
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
        open_parts.extend(rows);
    }
    let events: Vec<TerminalEvent> = touched
        .into_iter()
        .filter_map(|(report, message_id, delivery_id)| {
            let kind = match report.outcome {
                Outcome::Delivered if open_parts.contains(&(message_id.clone(), delivery_id)) => {
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
