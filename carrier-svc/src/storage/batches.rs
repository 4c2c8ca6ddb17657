//! The relay's batches at the carrier once stored (`accepting.rs`): what
//! the push reads, and held windows rolling. What happens to each
//! recipient afterwards is `states.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use chukei_proto::window::Window;
use sqlx::QueryBuilder;

use super::{ROWS_PER_READ, ROWS_PER_STATEMENT, Result, Store, in_list, unreadable};
use crate::channels::Contact;
use crate::model::{CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_SNS, ChannelSet, Lanes, Outgoing, Slot};
use crate::packed;

use super::states::State;

/// A batch row as the push reads it.
#[derive(sqlx::FromRow)]
struct HeldRow {
    seq: i64,
    message_id: String,
    content_text: String,
    media_url: String,
    subject: String,
    suggested_replies: String,
    trace_parent: String,
    window_open: i64,
    recipients: Vec<u8>,
    states: Vec<u8>,
}

impl Store {
    /// Held deliveries due now for users attached at `endpoint`, on a
    /// channel no gateway serves (`gateways`), with the subscriber contact
    /// details their channel adapters need: targeted messages' first (the
    /// relay's priority lane), then in arrival order.
    pub async fn due_for_endpoint(
        &self,
        endpoint: &str,
        gateways: ChannelSet,
        now: i64,
        lanes: Lanes,
        limit: u32,
    ) -> Result<Vec<Outgoing>> {
        let mut due = self
            .due(now, lanes, limit, |recipient, attached| {
                !gateways.contains(recipient.channel)
                    && attached.get(&recipient.user_id).map(|e| &**e) == Some(endpoint)
            })
            .await?;
        self.fill_contacts(&mut due, false).await?;
        Ok(due)
    }

    /// Held deliveries due now on `channel`, whoever they are for and
    /// wherever their terminal is: what a gateway (SMSC, mail server) takes.
    pub async fn due_on_channel(
        &self,
        channel: i64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<Outgoing>> {
        let mut due = self
            .due(now, Lanes::BOTH, limit, |recipient, _| {
                recipient.channel == channel
            })
            .await?;
        self.fill_contacts(&mut due, true).await?;
        Ok(due)
    }

    /// Up to `limit` held deliveries due now in `lanes` that `wanted` takes
    /// (given the recipient and where each attached user's terminal is):
    /// targeted messages' first, then in arrival order.
    async fn due(
        &self,
        now: i64,
        lanes: Lanes,
        limit: u32,
        wanted: impl Fn(&crate::model::Recipient, &HashMap<String, Arc<str>>) -> bool,
    ) -> Result<Vec<Outgoing>> {
        let limit = limit as usize;
        let mut due: Vec<Outgoing> = Vec::new();
        let read = [lanes.priority.then_some(true), lanes.bulk.then_some(false)];
        for priority in read.into_iter().flatten() {
            let mut after = 0_i64;
            while due.len() < limit {
                let rows: Vec<HeldRow> = sqlx::query_as(
                    "SELECT seq, message_id, content_text, media_url, subject, suggested_replies,
                            trace_parent, window_open, recipients, states
                     FROM batches
                     WHERE held > 0 AND priority = $1 AND seq > $2
                       AND expires_at > $3 AND window_close > $3 AND window_open <= $3
                     ORDER BY seq LIMIT $4",
                )
                .bind(priority)
                .bind(after)
                .bind(now)
                .bind(ROWS_PER_READ)
                .fetch_all(&self.pool)
                .await?;
                let Some(last) = rows.last() else { break };
                after = last.seq;
                // A short read is the lane's end: no read to find it empty.
                let lane_read = rows.len() < ROWS_PER_READ as usize;
                let attached = self.attached.read().expect("attachments lock");
                for row in rows {
                    let recipients =
                        packed::decode_recipients(&row.recipients).map_err(unreadable)?;
                    let replies = split_replies(&row.suggested_replies);
                    for (index, recipient) in recipients.into_iter().enumerate() {
                        if due.len() >= limit {
                            break;
                        }
                        if State::of(row.states[index]) != State::Held
                            || recipient.not_before.max(row.window_open) > now
                            || !wanted(&recipient, &attached)
                        {
                            continue;
                        }
                        due.push(Outgoing {
                            slot: Slot {
                                row: row.seq,
                                index: index as u32,
                            },
                            delivery_id: recipient.delivery_id,
                            message_id: row.message_id.clone(),
                            user_id: recipient.user_id,
                            channel: recipient.channel,
                            text: row.content_text.clone(),
                            media_url: row.media_url.clone(),
                            subject: row.subject.clone(),
                            suggested_replies: replies.clone(),
                            contact: Contact::default(),
                            trace_parent: row.trace_parent.clone(),
                        });
                    }
                }
                if lane_read {
                    break;
                }
            }
        }
        Ok(due)
    }

    /// Contact details, looked up only for the channels that need them (the
    /// phone number, with `phone`, for SMS on its way to an SMSC: a terminal
    /// push does not need it).
    async fn fill_contacts(&self, due: &mut [Outgoing], phone: bool) -> Result<()> {
        let wanted: Vec<&str> = due
            .iter()
            .filter(|d| {
                matches!(d.channel, CHANNEL_EMAIL | CHANNEL_SNS)
                    || (phone && d.channel == CHANNEL_SMS)
            })
            .map(|d| d.user_id.as_str())
            .collect();
        let mut contacts: HashMap<String, Contact> = HashMap::new();
        for chunk in wanted.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "SELECT user_id, email, sns_handle, phone_number FROM subscribers WHERE user_id",
            );
            in_list(&mut query, chunk.iter().copied());
            let rows: Vec<(String, String, String, String)> =
                query.build_query_as().fetch_all(&self.pool).await?;
            for (user_id, email, sns_handle, phone_number) in rows {
                contacts.insert(
                    user_id,
                    Contact {
                        email,
                        sns_handle,
                        phone_number,
                    },
                );
            }
        }
        for outgoing in due.iter_mut() {
            if let Some(contact) = contacts.get(&outgoing.user_id) {
                let only = |channel: i64, value: &String| {
                    if outgoing.channel == channel {
                        value.clone()
                    } else {
                        String::new()
                    }
                };
                outgoing.contact = Contact {
                    email: only(CHANNEL_EMAIL, &contact.email),
                    sns_handle: only(CHANNEL_SNS, &contact.sns_handle),
                    phone_number: only(CHANNEL_SMS, &contact.phone_number),
                };
            }
        }
        Ok(())
    }

    /// Held deliveries whose window closed before they could be pushed move
    /// to the window's next opening (or expire, when it has none). Returns
    /// how many moved.
    pub async fn roll_windows(&self, now: i64) -> Result<u64> {
        let windows: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT delivery_window FROM batches
             WHERE held > 0 AND window_close <= $1 AND delivery_window IS NOT NULL",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut cache = WindowCache::default();
        let mut moved = 0;
        for window in windows {
            let (open, close, expires) = match cache.opening(&window, now) {
                Some((open, close)) => (open, close, None),
                None => (now, now, Some(now)),
            };
            let held: Vec<i64> = sqlx::query_scalar(
                "UPDATE batches SET window_open = $1, window_close = $2, expires_at = COALESCE($3, expires_at)
                 WHERE held > 0 AND window_close <= $4 AND delivery_window = $5
                 RETURNING held",
            )
            .bind(open)
            .bind(close)
            .bind(expires)
            .bind(now)
            .bind(&window)
            .fetch_all(&self.pool)
            .await?;
            moved += held.iter().sum::<i64>() as u64;
        }
        Ok(moved)
    }
}

/// Windows decoded once per stored form (a zone lookup is not free).
#[derive(Debug, Default)]
pub(super) struct WindowCache(HashMap<String, Option<Window>>);

impl WindowCache {
    pub(super) fn opening(&mut self, stored: &str, at: i64) -> Option<(i64, i64)> {
        self.0
            .entry(stored.to_owned())
            .or_insert_with(|| match Window::decode(stored) {
                Ok(window) => Some(window),
                Err(error) => {
                    tracing::warn!(%error, "unreadable window: delivering without it");
                    None
                }
            })
            .as_ref()
            .map_or(Some((at, i64::MAX)), |window| window.opening(at))
    }
}

pub(super) fn split_replies(stored: &str) -> Vec<String> {
    stored
        .split('\n')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::{
        CHANNEL_SMS, MessageDeliveries, ReceiptKind, Recipient, Subscriber, TerminalEvent,
        TerminalEventKind,
    };

    pub(in crate::storage) fn record(
        message_id: &str,
        ids: std::ops::Range<u64>,
        priority: bool,
    ) -> MessageDeliveries {
        MessageDeliveries {
            message_id: message_id.into(),
            text: "hi".into(),
            media_url: String::new(),
            subject: String::new(),
            suggested_replies: Vec::new(),
            expires_at: i64::MAX,
            window: None,
            single_attempt: true,
            trace_parent: String::new(),
            priority,
            recipients: ids
                .map(|id| Recipient {
                    delivery_id: id,
                    user_id: format!("u{}", id % 10),
                    channel: CHANNEL_SMS,
                    not_before: 0,
                })
                .collect(),
        }
    }

    pub(in crate::storage) async fn store_with_terminals(dir: &tempfile::TempDir) -> Store {
        let store = Store::connect(&Store::sqlite_url_in(dir.path()))
            .await
            .unwrap();
        let users: Vec<String> = (0..10).map(|u| format!("u{u}")).collect();
        let subscribers: Vec<Subscriber> = users
            .iter()
            .map(|user_id| Subscriber {
                user_id: user_id.clone(),
                phone_number: "+819000000000".into(),
                name: String::new(),
                gender: 0,
                birth_date: "1990-01-01".into(),
                region: String::new(),
                occupation: String::new(),
                primary: true,
                email: String::new(),
                sns_handle: String::new(),
            })
            .collect();
        store.upsert_subscribers(&subscribers, 0).await.unwrap();
        store.attach("terminals", &users, 0).await.unwrap();
        store
    }

    /// A targeted message that arrives behind a campaign's backlog is pushed
    /// first; the backlog then goes in arrival order.
    #[tokio::test]
    async fn priority_deliveries_are_pushed_before_the_held_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        store
            .accept_batch(vec![record("campaign", 1..51, false)], 1)
            .await
            .unwrap();
        store
            .accept_batch(vec![record("urgent", 51..52, true)], 2)
            .await
            .unwrap();

        let due = store
            .due_for_endpoint("terminals", ChannelSet::EMPTY, 3, Lanes::BOTH, 10)
            .await
            .unwrap();
        let ids: Vec<u64> = due.iter().map(|d| d.delivery_id).collect();
        assert_eq!(ids, [51, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let all = store
            .due_for_endpoint("terminals", ChannelSet::EMPTY, 3, Lanes::BOTH, 100)
            .await
            .unwrap();
        assert_eq!(all.len(), 51, "each once");
        store.close().await;
    }

    /// A targeted message's batch goes ahead of a campaign's batch that
    /// waits to write: it neither waits for the campaign's lane of accepted
    /// ids (held across the campaign batch's commit) nor behind it for the
    /// write turn — only for the writer holding the turn and the one at the
    /// lock. The same delivery id sent again on its lane is still dropped.
    #[tokio::test]
    async fn a_priority_batch_goes_ahead_of_a_campaign_batch_waiting_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(50));
        let holding = store.write_turn().await;
        // Another writer at the lock, holding the turn until told.
        let (let_go, hold) = tokio::sync::oneshot::channel::<()>();
        let next = tokio::spawn({
            let store = store.clone();
            async move {
                let _turn = store.write_turn().await;
                let _ = hold.await;
            }
        });
        settle().await;
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        let accept = |name: &'static str, ids: std::ops::Range<u64>, priority: bool| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let fresh = store
                    .accept_batch(vec![record(name, ids, priority)], 1)
                    .await
                    .unwrap();
                done.send(name).unwrap();
                fresh
            })
        };
        let campaign = accept("campaign", 1..51, false);
        settle().await;
        let urgent = accept("urgent", 51..52, true);
        settle().await;
        drop(holding);
        settle().await;
        let_go.send(()).unwrap();
        next.await.unwrap();
        assert_eq!((campaign.await.unwrap(), urgent.await.unwrap()), (50, 1));
        let finished = [order.recv().await.unwrap(), order.recv().await.unwrap()];
        assert_eq!(finished, ["urgent", "campaign"]);
        assert_eq!(
            store
                .accept_batch(vec![record("urgent", 51..52, true)], 2)
                .await
                .unwrap(),
            0
        );
        store.close().await;
    }

    /// A batch sent again (a reconnect, a re-offer) adds nothing, also after a
    /// restart; events move each delivery forward once, with one receipt per
    /// move and one count per person.
    #[tokio::test]
    async fn duplicates_are_dropped_and_each_move_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        let batch = vec![record("m", 1..6, false), record("n", 6..8, false)];
        assert_eq!(store.accept_batch(batch.clone(), 1).await.unwrap(), 7);
        assert_eq!(store.accept_batch(batch.clone(), 2).await.unwrap(), 0);
        store.close().await;
        let store = Store::connect(&Store::sqlite_url_in(dir.path()))
            .await
            .unwrap();
        assert_eq!(store.accept_batch(batch, 3).await.unwrap(), 0);
        let mut more = record("m", 5..9, false);
        more.recipients
            .retain(|r| r.delivery_id != 6 && r.delivery_id != 7);
        assert_eq!(
            store.accept_batch(vec![more], 3).await.unwrap(),
            1,
            "5 seen, 8 new"
        );

        let due = store
            .due_for_endpoint("terminals", ChannelSet::EMPTY, 4, Lanes::BOTH, 100)
            .await
            .unwrap();
        assert_eq!(due.len(), 8);
        let slots: Vec<Slot> = due.iter().map(|d| d.slot).collect();
        store.mark_pushed(&slots).await.unwrap();
        assert!(
            store
                .due_for_endpoint("terminals", ChannelSet::EMPTY, 4, Lanes::BOTH, 100)
                .await
                .unwrap()
                .is_empty()
        );
        let event = |id: u64, message: &str, kind| TerminalEvent {
            delivery_id: id,
            message_id: message.into(),
            kind,
            at: 10,
            region: "tokyo".into(),
            trace_parent: String::new(),
        };
        let events = [
            event(1, "m", TerminalEventKind::Delivered),
            event(1, "m", TerminalEventKind::Delivered),
            event(2, "m", TerminalEventKind::Read),
            event(3, "m", TerminalEventKind::Unsupported),
            event(6, "n", TerminalEventKind::Delivered),
            event(6, "m", TerminalEventKind::Delivered),
            event(99, "m", TerminalEventKind::Delivered),
        ];
        // 1 delivered, 2 delivered + opened, 3 unsupported, 6 delivered.
        assert_eq!(store.apply_terminal_events(&events).await.unwrap(), 5);
        assert_eq!(store.apply_terminal_events(&events).await.unwrap(), 0);
        let receipts = store.outbox_read(0, 100).await.unwrap().0;
        let kinds: Vec<(u64, ReceiptKind)> =
            receipts.iter().map(|r| (r.delivery_id, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (1, ReceiptKind::Delivered),
                (2, ReceiptKind::Delivered),
                (2, ReceiptKind::Opened),
                (3, ReceiptKind::Unsupported),
                (6, ReceiptKind::Delivered),
            ]
        );
        let (counts, held) = store.counts(Some("m")).await.unwrap();
        assert_eq!(held, 0);
        assert_eq!(
            (counts[0].sent, counts[0].opened, counts[0].unsupported),
            (2, 1, 1)
        );
        assert_eq!(counts[0].sms_segments, 2);
        store.ack_outbox(receipts[0].seq);
        assert!(store.outbox_read(0, 100).await.unwrap().0.is_empty());
        assert_eq!(store.trim_outbox().await.unwrap(), 1, "one row of receipts");
        assert_eq!(store.trim_outbox().await.unwrap(), 0, "trimmed already");

        // Unconfirmed pushes go out again after a reconnect; expiry closes the rest.
        store
            .requeue_unconfirmed("terminals", ChannelSet::EMPTY)
            .await
            .unwrap();
        let again = store
            .due_for_endpoint("terminals", ChannelSet::EMPTY, 5, Lanes::BOTH, 100)
            .await
            .unwrap();
        let ids: Vec<u64> = again.iter().map(|d| d.delivery_id).collect();
        assert_eq!(ids, [4, 5, 7, 8]);
        assert_eq!(store.drop_held(&["u4"]).await.unwrap(), 1);
        assert_eq!(store.expire(i64::MAX).await.unwrap(), 3);
        store.close().await;
    }

    /// What version 1's per-delivery tables still held when the carrier was
    /// upgraded is moved at start-up: held and pushed deliveries are held
    /// again in batch rows (grouped per message, replies and window kept),
    /// delivered ones are not, unsent receipts are queued, and the ids
    /// count as seen.
    #[tokio::test]
    async fn version_1_rows_are_moved_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_terminals(&dir).await;
        for (id, state, user) in [("11", 0, "u1"), ("12", 1, "u2"), ("13", 2, "u3")] {
            sqlx::query(
                "INSERT INTO deliveries_v1 (delivery_id, message_id, user_id, channel, content_text,
                        media_url, not_before, expires_at, state, received_at, subject,
                        suggested_replies, trace_parent, priority)
                 VALUES ($1, 'old', $2, $3, 'before the upgrade', '', 0, 9000000000000, $4, 0,
                         'subject', 'yes\nno', '', FALSE)",
            )
            .bind(id)
            .bind(user)
            .bind(CHANNEL_SMS)
            .bind(state)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO outbox_v1 (message_id, user_id, kind, channel, at, region, delivery_id, trace_parent)
             VALUES ('older', 'u4', 1, 1, 5, 'tokyo', '9', '')",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.close().await;

        let store = Store::connect(&Store::sqlite_url_in(dir.path()))
            .await
            .unwrap();
        let due = store
            .due_for_endpoint("terminals", ChannelSet::EMPTY, 1, Lanes::BOTH, 100)
            .await
            .unwrap();
        let mut moved: Vec<(u64, &str)> = due
            .iter()
            .map(|d| (d.delivery_id, d.user_id.as_str()))
            .collect();
        moved.sort_unstable();
        assert_eq!(moved, [(11, "u1"), (12, "u2")]);
        assert_eq!(due[0].text, "before the upgrade");
        assert_eq!(due[0].subject, "subject");
        assert_eq!(due[0].suggested_replies, ["yes", "no"]);
        let receipts = store.outbox_read(0, 100).await.unwrap().0;
        assert_eq!(receipts.len(), 1);
        assert_eq!(
            (receipts[0].delivery_id, receipts[0].message_id.as_str()),
            (9, "older")
        );
        assert_eq!(receipts[0].kind, ReceiptKind::Delivered);
        // Accepted before the upgrade: the same ids again add nothing.
        assert_eq!(
            store
                .accept_batch(vec![record("old", 11..13, false)], 2)
                .await
                .unwrap(),
            0
        );
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM deliveries_v1 WHERE state IN (0, 1)")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(left, 0);
        store.close().await;
    }
}
