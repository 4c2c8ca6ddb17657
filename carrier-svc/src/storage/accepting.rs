//! Accepting the relay's batches at the carrier: delivery ids accepted
//! before are dropped (per lane), and each message record becomes one row
//! with its recipients packed and every one held. What the push reads from
//! the rows is `batches.rs`.

use std::collections::HashSet;

use roaring::RoaringTreemap;
use sqlx::{QueryBuilder, Sqlite};

use super::batches::WindowCache;
use super::states::State;
use super::{Result, Store};
use crate::channels;
use crate::model::MessageDeliveries;
use crate::packed;

/// The delivery ids accepted, per lane: a delivery is in one lane for good
/// (the relay decides it when it plans the attempt), so a batch of one
/// lane checks and extends only its lane's set, and a priority batch never
/// waits for a campaign's batch holding the other across its commit.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) priority: tokio::sync::Mutex<RoaringTreemap>,
    pub(super) bulk: tokio::sync::Mutex<RoaringTreemap>,
}

impl Seen {
    fn of(&self, priority: bool) -> &tokio::sync::Mutex<RoaringTreemap> {
        if priority { &self.priority } else { &self.bulk }
    }
}

impl Store {
    /// Stores a batch from the relay, one row per message record; delivery
    /// ids seen before are dropped. A record with a window is held for the
    /// window's current or next opening. Returns how many deliveries were
    /// new. A priority batch (the relay's priority stream) checks only the
    /// priority lane's ids and goes ahead of other writers waiting for the
    /// write turn; a batch of both lanes (none comes from a current relay)
    /// is stored as two, one commit each.
    pub async fn accept_batch(&self, records: Vec<MessageDeliveries>, now: i64) -> Result<u64> {
        let (priority, bulk): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.priority);
        let mut fresh = 0;
        for (lane, records) in [(true, priority), (false, bulk)] {
            if !records.is_empty() {
                fresh += self.accept_lane(lane, records, now).await?;
            }
        }
        Ok(fresh)
    }

    /// [`Store::accept_batch`] for records all of one lane.
    async fn accept_lane(
        &self,
        priority: bool,
        mut records: Vec<MessageDeliveries>,
        now: i64,
    ) -> Result<u64> {
        // Held across the commit: the check and the insert are one step.
        let mut seen = self.seen.of(priority).lock().await;
        let mut in_batch = HashSet::new();
        for record in &mut records {
            record
                .recipients
                .retain(|r| !seen.contains(r.delivery_id) && in_batch.insert(r.delivery_id));
        }
        records.retain(|r| !r.recipients.is_empty());
        if records.is_empty() {
            return Ok(0);
        }
        let (mut tx, _turn) = self.begin_write_ahead(priority).await?;
        insert_rows(&mut tx, &records, now).await?;
        tx.commit().await?;
        seen.extend(in_batch.iter().copied());
        Ok(in_batch.len() as u64)
    }
}

/// Inserts one batch row per record, every recipient held.
pub(super) async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    records: &[MessageDeliveries],
    now: i64,
) -> Result<()> {
    let mut windows = WindowCache::default();
    // A statement binds 20 values a row.
    for chunk in records.chunks(500) {
        let mut query = QueryBuilder::new(
            "INSERT INTO batches (message_id, priority, single_attempt, content_text, media_url, subject, \
             suggested_replies, sms_segments, delivery_window, window_open, window_close, expires_at, \
             trace_parent, min_id, max_id, recipients, states, held, pushed, received_at) ",
        );
        query.push_values(chunk, |mut row, record| {
            let first_due = record
                .recipients
                .iter()
                .map(|r| r.not_before)
                .min()
                .unwrap_or(0);
            let (window_open, window_close, expires_at) = match &record.window {
                None => (0, i64::MAX, record.expires_at),
                Some(window) => match windows.opening(window, now.max(first_due)) {
                    Some((open, close)) => (open, close, record.expires_at),
                    // A window that never opens again: due to expire at once.
                    None => (now, now, now),
                },
            };
            let held = record.recipients.len() as i64;
            let ids = record.recipients.iter().map(|r| r.delivery_id);
            let (min_id, max_id) = (ids.clone().min().unwrap_or(0), ids.max().unwrap_or(0));
            row.push_bind(&record.message_id)
                .push_bind(record.priority)
                .push_bind(record.single_attempt)
                .push_bind(&record.text)
                .push_bind(&record.media_url)
                .push_bind(&record.subject)
                .push_bind(record.suggested_replies.join("\n"))
                .push_bind(channels::sms_segments(&record.text).len() as i64)
                .push_bind(&record.window)
                .push_bind(window_open)
                .push_bind(window_close)
                .push_bind(expires_at)
                .push_bind(&record.trace_parent)
                .push_bind(min_id as i64)
                .push_bind(max_id as i64)
                .push_bind(packed::encode_recipients(&record.recipients))
                .push_bind(vec![State::Held as u8; record.recipients.len()])
                .push_bind(held)
                .push_bind(0_i64)
                .push_bind(now);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}
