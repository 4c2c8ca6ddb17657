//! The carrier's receipts on their way to the relay: the outbox (one row
//! per group of receipts, a blob in `packed`'s form) read in sequence and
//! dropped once the relay acked it, and the per-message counts each moved
//! delivery adds (a person counted once per message however many attempts
//! reach them).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use sqlx::{QueryBuilder, Sqlite};

use super::states::{Moved, State};
use super::{ROWS_PER_STATEMENT, Result, Store, unreadable};
use crate::model::{Receipt, ReceiptKind};
use crate::packed;

impl Store {
    /// Queued receipts after `after_seq`: whole outbox rows, until at least
    /// `limit` receipts (each carries its row's sequence); and whether that
    /// was all the outbox held when it was read (so nobody need read it
    /// again to find it empty).
    pub async fn outbox_read(&self, after_seq: i64, limit: u32) -> Result<(Vec<Receipt>, bool)> {
        const ROWS: usize = 16;
        // Rows the relay acked but not yet trimmed are not sent again.
        let after_seq = after_seq.max(self.outbox.acked.load(Ordering::Relaxed));
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, receipts FROM receipt_outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(ROWS as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut drained = rows.len() < ROWS;
        let mut receipts = Vec::new();
        for (seq, blob) in rows {
            if receipts.len() >= limit as usize {
                drained = false;
                break;
            }
            receipts.extend(
                packed::decode_receipts(&blob)
                    .map_err(unreadable)?
                    .into_iter()
                    .map(|receipt| Receipt { seq, ..receipt }),
            );
        }
        Ok((receipts, drained))
    }

    /// The relay stored every receipt up to `seq`: they are not read again,
    /// and leave the outbox at its next trim ([`Store::trim_outbox`]).
    /// Removing them here, a commit per ack, held the write turn for a
    /// sync of the WAL ~400 times a second on an idle hub sending one
    /// message at a time, in the way of the next message's batch.
    pub fn ack_outbox(&self, seq: i64) {
        self.outbox.acked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Removes the receipts the relay acked since the last trim, in one
    /// statement; how many rows went. Nothing acked is lost if the process
    /// dies first: the relay is sent those receipts again after a restart,
    /// and counts each event once whatever arrives twice.
    pub async fn trim_outbox(&self) -> Result<u64> {
        let acked = self.outbox.acked.load(Ordering::Relaxed);
        if acked <= self.outbox.trimmed.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let _turn = self.write_turn().await;
        let removed = sqlx::query("DELETE FROM receipt_outbox WHERE seq <= $1")
            .bind(acked)
            .execute(&self.pool)
            .await?
            .rows_affected();
        self.outbox.trimmed.fetch_max(acked, Ordering::Relaxed);
        Ok(removed)
    }
}

/// Counts moves: a delivery is a send (with its SMS parts), a read an open,
/// each once per person — a person's only attempt counts directly, where
/// more attempts may reach them `reach` counts each person once.
pub(super) async fn count_moves(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    moved: &[Moved],
) -> Result<()> {
    let mut counted: Vec<(String, Counted)> = Vec::new();
    for (state, step) in [
        (State::Delivered, Counted::Sent),
        (State::Opened, Counted::Opened),
    ] {
        let of_state = moved.iter().filter(|m| m.to == state);
        let (single, repeated): (Vec<&Moved>, Vec<&Moved>) =
            of_state.partition(|m| m.single_attempt);
        counted.extend(single.iter().map(|m| (m.message_id.clone(), step)));
        let people: Vec<(&str, &str)> = repeated
            .iter()
            .map(|m| (m.message_id.as_str(), m.user_id.as_str()))
            .collect();
        for chunk in people.chunks(ROWS_PER_STATEMENT) {
            let first = reach(tx, chunk, step == Counted::Opened).await?;
            counted.extend(first.into_iter().map(|m| (m, step)));
        }
    }
    for m in moved {
        match m.to {
            State::Delivered => {
                counted.push((m.message_id.clone(), Counted::Segments(m.sms_segments)))
            }
            State::Unsupported => counted.push((m.message_id.clone(), Counted::Unsupported)),
            State::Expired => counted.push((m.message_id.clone(), Counted::Expired)),
            _ => {}
        }
    }
    count(tx, counted.iter().map(|(m, c)| (m.as_str(), *c))).await
}

/// Deliveries the carrier closed itself, reported to the relay as `kind` at
/// `now` and counted. Returns how many receipts were queued.
pub(super) async fn report_closed(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    moved: Vec<Moved>,
    kind: ReceiptKind,
    now: i64,
) -> Result<usize> {
    let receipts: Vec<Receipt> = moved
        .iter()
        .map(|m| Receipt {
            seq: 0,
            delivery_id: m.delivery_id,
            message_id: m.message_id.clone(),
            user_id: m.user_id.clone(),
            kind,
            channel: m.channel,
            at: now,
            region: String::new(),
            trace_parent: String::new(),
        })
        .collect();
    queue_receipts(tx, &receipts).await?;
    count_moves(tx, &moved).await?;
    Ok(receipts.len())
}

/// Appends receipts to the outbox, one row per group of up to 10,000.
pub(super) async fn queue_receipts(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    receipts: &[Receipt],
) -> Result<()> {
    for chunk in receipts.chunks(10_000) {
        sqlx::query("INSERT INTO receipt_outbox (receipts, count) VALUES ($1, $2)")
            .bind(packed::encode_receipts(chunk))
            .bind(chunk.len() as i64)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Records that these people were reached (or, with `opened`, opened) and
/// returns the message id of each first time — the per-person counts.
async fn reach(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    people: &[(&str, &str)],
    opened: bool,
) -> Result<Vec<String>> {
    if people.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = if opened {
        let mut query = QueryBuilder::new("UPDATE reach SET opened = TRUE FROM (");
        query.push_values(people, |mut row, (message_id, user_id)| {
            row.push_bind(*message_id).push_bind(*user_id);
        });
        query.push(
            ") AS v WHERE reach.message_id = v.column1 AND reach.user_id = v.column2 AND NOT reach.opened \
             RETURNING reach.message_id",
        );
        query
    } else {
        let mut query = QueryBuilder::new("INSERT INTO reach (message_id, user_id) ");
        query.push_values(people, |mut row, (message_id, user_id)| {
            row.push_bind(*message_id).push_bind(*user_id);
        });
        query.push(" ON CONFLICT DO NOTHING RETURNING message_id");
        query
    };
    query.build_query_scalar().fetch_all(&mut **tx).await
}

/// What a counted step adds to a message's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Sent,
    Opened,
    Segments(i64),
    Unsupported,
    Expired,
}

/// Adds counted steps to the per-message counts (marked for the next report).
async fn count(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    steps: impl Iterator<Item = (&str, Counted)>,
) -> Result<()> {
    // sent, opened, sms segments, unsupported, expired
    let mut counts: HashMap<&str, [i64; 5]> = HashMap::new();
    for (message_id, step) in steps {
        let entry = counts.entry(message_id).or_default();
        match step {
            Counted::Sent => entry[0] += 1,
            Counted::Opened => entry[1] += 1,
            Counted::Segments(n) => entry[2] += n,
            Counted::Unsupported => entry[3] += 1,
            Counted::Expired => entry[4] += 1,
        }
    }
    let counts: Vec<(&str, [i64; 5])> = counts.into_iter().filter(|(_, c)| *c != [0; 5]).collect();
    for chunk in counts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "INSERT INTO message_counts (message_id, sent, opened, sms_segments, unsupported, expired, dirty) ",
        );
        query.push_values(chunk, |mut row, (message_id, c)| {
            row.push_bind(*message_id);
            for value in c {
                row.push_bind(*value);
            }
            row.push_bind(true);
        });
        query.push(
            " ON CONFLICT (message_id) DO UPDATE SET sent = message_counts.sent + excluded.sent, \
             opened = message_counts.opened + excluded.opened, \
             sms_segments = message_counts.sms_segments + excluded.sms_segments, \
             unsupported = message_counts.unsupported + excluded.unsupported, \
             expired = message_counts.expired + excluded.expired, dirty = TRUE",
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}
