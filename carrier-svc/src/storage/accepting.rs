//! Accepting the relay's batches at the carrier: delivery ids accepted
//! before are dropped (per lane), and each message record becomes one row
//! with its recipients packed, each held — or, in a priority batch, pushed
//! while the batch commits. What the push reads from the rows is
//! `batches.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use roaring::RoaringTreemap;
use sqlx::{QueryBuilder, Sqlite};

use super::batches::WindowCache;
use super::states::State;
use super::{Result, Store};
use crate::channels::{self, Contact};
use crate::model::{CHANNEL_EMAIL, CHANNEL_SNS, ChannelSet, MessageDeliveries, Outgoing, Slot};
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

/// When a record's recipients may be pushed, fixed as it is stored: its
/// window's current or next opening and close, and when it expires.
#[derive(Clone, Copy, Debug)]
pub(super) struct Opening {
    open: i64,
    close: i64,
    expires_at: i64,
}

impl Opening {
    /// Each record's opening at `now`: a record with a window is held for
    /// the window's current or next opening.
    pub(super) fn of_each(records: &[MessageDeliveries], now: i64) -> Vec<Self> {
        let mut windows = WindowCache::default();
        records
            .iter()
            .map(|record| {
                let first_due = record
                    .recipients
                    .iter()
                    .map(|r| r.not_before)
                    .min()
                    .unwrap_or(0);
                match &record.window {
                    None => Self {
                        open: 0,
                        close: i64::MAX,
                        expires_at: record.expires_at,
                    },
                    Some(window) => match windows.opening(window, now.max(first_due)) {
                        Some((open, close)) => Self {
                            open,
                            close,
                            expires_at: record.expires_at,
                        },
                        // A window that never opens again: due to expire at once.
                        None => Self {
                            open: now,
                            close: now,
                            expires_at: now,
                        },
                    },
                }
            })
            .collect()
    }

    /// Whether a recipient held since `not_before` may be pushed at `now`
    /// (the rule the push's read applies to stored rows).
    pub(super) fn due(&self, not_before: i64, now: i64) -> bool {
        self.expires_at > now && self.close > now && not_before.max(self.open) <= now
    }
}

/// A batch accepted: how many deliveries were new, and how many of them
/// were pushed at once (stored as pushed, not held).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub fresh: u64,
    pub pushed: u64,
}

/// The recipients of a priority batch that could go to a terminal at
/// once, by the endpoint their terminal is attached at; each [`Outgoing`]'s
/// slot names the record (its index in the batch) and the recipient.
pub type PushableNow = Vec<(Arc<str>, Vec<Outgoing>)>;

impl Store {
    /// Stores a batch from the relay, one row per message record; delivery
    /// ids seen before are dropped. A record with a window is held for the
    /// window's current or next opening. Returns how many deliveries were
    /// new. A priority batch (the relay's priority stream) checks only the
    /// priority lane's ids and goes ahead of other writers waiting for the
    /// write turn; a batch of both lanes (none comes from a current relay)
    /// is stored as two, one commit each.
    pub async fn accept_batch(&self, records: Vec<MessageDeliveries>, now: i64) -> Result<u64> {
        let accepted = self
            .accept_batch_pushing(records, now, ChannelSet::EMPTY, |_| Vec::new())
            .await?;
        Ok(accepted.fresh)
    }

    /// [`Store::accept_batch`], pushing what it can of the priority lane
    /// while the batch commits: one durable wait on a targeted message's
    /// path (the relay's commit), not two.
    ///
    /// Once this store's write turn is taken, `push` is given the new
    /// priority recipients due now on a channel no gateway serves
    /// (`gateways`) and needing no contact details (not e-mail, not SNS),
    /// whose terminal is attached, by endpoint. It pushes what it can
    /// without waiting and returns the slots it pushed; those are stored as
    /// pushed in the same commit, the rest held for the push's own read.
    /// Nothing is acknowledged before the commit, so a crash before it
    /// loses only the acknowledgement: the relay sends the batch again and
    /// the recipient is pushed again (terminals drop duplicate delivery
    /// ids). A terminal's events wait for the write turn, so they find the
    /// row. A push that never arrives is a pushed delivery unconfirmed, as
    /// from the push's own path: pushed again when its link reconnects.
    pub async fn accept_batch_pushing(
        &self,
        records: Vec<MessageDeliveries>,
        now: i64,
        gateways: ChannelSet,
        push: impl FnOnce(PushableNow) -> Vec<Slot>,
    ) -> Result<Accepted> {
        let (priority, bulk): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.priority);
        let mut accepted = Accepted::default();
        if !priority.is_empty() {
            let push_now = |records: &[MessageDeliveries], openings: &[Opening]| {
                push(self.pushable_now(records, openings, gateways, now))
            };
            accepted = self.accept_lane(true, priority, now, push_now).await?;
        }
        if !bulk.is_empty() {
            let nothing = |_: &[MessageDeliveries], _: &[Opening]| Vec::new();
            accepted.fresh += self.accept_lane(false, bulk, now, nothing).await?.fresh;
        }
        Ok(accepted)
    }

    /// [`Store::accept_batch_pushing`] for records all of one lane:
    /// `push_now` is called with the new records and their openings once
    /// the write turn is taken, and returns the slots it pushed.
    async fn accept_lane(
        &self,
        priority: bool,
        mut records: Vec<MessageDeliveries>,
        now: i64,
        push_now: impl FnOnce(&[MessageDeliveries], &[Opening]) -> Vec<Slot>,
    ) -> Result<Accepted> {
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
            return Ok(Accepted::default());
        }
        let openings = Opening::of_each(&records, now);
        let (mut tx, _turn) = self.begin_write_ahead(priority).await?;
        let pushed = push_now(&records, &openings);
        insert_rows(&mut tx, &records, &openings, &pushed, now).await?;
        tx.commit().await?;
        seen.extend(in_batch.iter().copied());
        Ok(Accepted {
            fresh: in_batch.len() as u64,
            pushed: pushed.len() as u64,
        })
    }

    /// The recipients of `records` a terminal could be pushed at once, by
    /// endpoint (see [`Store::accept_batch_pushing`]).
    fn pushable_now(
        &self,
        records: &[MessageDeliveries],
        openings: &[Opening],
        gateways: ChannelSet,
        now: i64,
    ) -> PushableNow {
        let attached = self.attached.read().expect("attachments lock");
        let mut by_endpoint: HashMap<Arc<str>, Vec<Outgoing>> = HashMap::new();
        for (row, (record, opening)) in records.iter().zip(openings).enumerate() {
            for (index, recipient) in record.recipients.iter().enumerate() {
                let Some(endpoint) = attached.get(&recipient.user_id) else {
                    continue;
                };
                if !opening.due(recipient.not_before, now)
                    || gateways.contains(recipient.channel)
                    || matches!(recipient.channel, CHANNEL_EMAIL | CHANNEL_SNS)
                {
                    continue;
                }
                by_endpoint
                    .entry(endpoint.clone())
                    .or_default()
                    .push(Outgoing {
                        slot: Slot {
                            row: row as i64,
                            index: index as u32,
                        },
                        delivery_id: recipient.delivery_id,
                        message_id: record.message_id.clone(),
                        user_id: recipient.user_id.clone(),
                        channel: recipient.channel,
                        text: record.text.clone(),
                        media_url: record.media_url.clone(),
                        subject: record.subject.clone(),
                        suggested_replies: record.suggested_replies.clone(),
                        contact: Contact::default(),
                        trace_parent: record.trace_parent.clone(),
                    });
            }
        }
        by_endpoint.into_iter().collect()
    }
}

/// Inserts one batch row per record with its `openings`: every recipient
/// held, but those in `pushed` (slots naming a record by its index in
/// `records`), stored as pushed.
pub(super) async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    records: &[MessageDeliveries],
    openings: &[Opening],
    pushed: &[Slot],
    now: i64,
) -> Result<()> {
    let mut states: Vec<Vec<u8>> = records
        .iter()
        .map(|record| vec![State::Held as u8; record.recipients.len()])
        .collect();
    for slot in pushed {
        states[slot.row as usize][slot.index as usize] = State::Pushed as u8;
    }
    let rows: Vec<(&MessageDeliveries, &Opening, &Vec<u8>)> = records
        .iter()
        .zip(openings)
        .zip(&states)
        .map(|((record, opening), states)| (record, opening, states))
        .collect();
    // A statement binds 20 values a row.
    for chunk in rows.chunks(500) {
        let mut query = QueryBuilder::new(
            "INSERT INTO batches (message_id, priority, single_attempt, content_text, media_url, subject, \
             suggested_replies, sms_segments, delivery_window, window_open, window_close, expires_at, \
             trace_parent, min_id, max_id, recipients, states, held, pushed, received_at) ",
        );
        query.push_values(chunk, |mut row, (record, opening, states)| {
            let count = |state: State| states.iter().filter(|&&s| s == state as u8).count() as i64;
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
                .push_bind(opening.open)
                .push_bind(opening.close)
                .push_bind(opening.expires_at)
                .push_bind(&record.trace_parent)
                .push_bind(min_id as i64)
                .push_bind(max_id as i64)
                .push_bind(packed::encode_recipients(&record.recipients))
                .push_bind((*states).clone())
                .push_bind(count(State::Held))
                .push_bind(count(State::Pushed))
                .push_bind(now);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CHANNEL_RCS, CHANNEL_SMS, Lanes};
    use crate::storage::batches::tests::{record, store_with_terminals};

    /// What a priority batch offers to push at once: its recipients due
    /// now, attached, on a channel a terminal takes without contact
    /// details that no gateway serves. What was pushed is stored as pushed
    /// (the push's read does not push it again, a reconnect does); what
    /// was not is held for that read.
    #[tokio::test]
    async fn a_priority_batch_pushes_at_once_what_it_can_and_holds_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        let mut urgent = record("urgent", 1..8, true);
        let channels = [
            CHANNEL_SMS,
            CHANNEL_RCS,
            CHANNEL_EMAIL,
            CHANNEL_SNS,
            CHANNEL_SMS,
            CHANNEL_SMS,
            CHANNEL_RCS,
        ];
        for (recipient, channel) in urgent.recipients.iter_mut().zip(channels) {
            recipient.channel = channel;
        }
        urgent.recipients[4].not_before = 50; // not due yet
        urgent.recipients[5].user_id = "nobody attached".into();
        let mut later = record("later", 8..9, true);
        later.window = Some("not a window".into()); // unreadable: no window
        let campaign = record("campaign", 9..10, false);
        let gateways = ChannelSet::EMPTY.with(CHANNEL_RCS);

        let mut offered: Vec<(String, u64)> = Vec::new();
        let accepted = store
            .accept_batch_pushing(vec![urgent, later, campaign], 10, gateways, |pushable| {
                let mut pushed = Vec::new();
                for (endpoint, due) in pushable {
                    for outgoing in due {
                        offered.push((endpoint.to_string(), outgoing.delivery_id));
                        // The terminal's stream had room for one of them.
                        if outgoing.delivery_id == 1 {
                            pushed.push(outgoing.slot);
                        }
                    }
                }
                pushed
            })
            .await
            .unwrap();
        offered.sort();
        assert_eq!(
            offered,
            [("terminals".to_owned(), 1), ("terminals".to_owned(), 8)],
            "SMS due now for attached users, in both records of the priority lane"
        );
        assert_eq!(
            accepted,
            Accepted {
                fresh: 9,
                pushed: 1
            }
        );

        let held = |now| store.due_for_endpoint("terminals", gateways, now, Lanes::BOTH, 100);
        let ids = |due: Vec<Outgoing>| due.iter().map(|d| d.delivery_id).collect::<Vec<_>>();
        assert_eq!(
            ids(held(10).await.unwrap()),
            [3, 4, 8, 9],
            "the one pushed is not pushed again; RCS is the gateway's"
        );
        store
            .requeue_unconfirmed("terminals", gateways)
            .await
            .unwrap();
        assert_eq!(
            ids(held(60).await.unwrap()),
            [1, 3, 4, 5, 8, 9],
            "after a reconnect the one pushed at once is pushed again"
        );
        store.close().await;
    }

    /// A carrier that dies after pushing at once but before its commit
    /// has stored and acked nothing: the relay's resend of the batch is
    /// new to it, and its recipients are offered to push again (the
    /// terminal drops the duplicate).
    #[tokio::test]
    async fn a_batch_pushed_but_never_committed_is_accepted_and_pushed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        let offered = |pushable: PushableNow| -> Vec<Slot> {
            pushable
                .into_iter()
                .flat_map(|(_, due)| due.into_iter().map(|outgoing| outgoing.slot))
                .collect()
        };

        let (pushed, crash) = tokio::sync::oneshot::channel::<()>();
        let mut pushed = Some(pushed);
        let accepting = store.accept_batch_pushing(
            vec![record("urgent", 1..3, true)],
            10,
            ChannelSet::EMPTY,
            |pushable| {
                let slots = offered(pushable);
                assert_eq!(slots.len(), 2);
                pushed.take().unwrap().send(()).unwrap();
                slots
            },
        );
        tokio::select! {
            biased;
            // The process dies right after the push, before the commit.
            _ = crash => {}
            accepted = accepting => panic!("committed before the crash: {accepted:?}"),
        }

        let again = store
            .accept_batch_pushing(
                vec![record("urgent", 1..3, true)],
                20,
                ChannelSet::EMPTY,
                offered,
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            Accepted {
                fresh: 2,
                pushed: 2
            }
        );
        store.close().await;
    }
}
