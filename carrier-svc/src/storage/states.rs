//! What happens to each recipient of a batch row after it was accepted:
//! pushed, delivered, opened, expired, unsupported, dropped — one byte of
//! the row's `states` each, with the receipts and counts each change makes.
//! A recipient moves forward only; each change reads and writes its rows
//! inside one `BEGIN IMMEDIATE` transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{QueryBuilder, Sqlite};

use super::receipts::{count_moves, queue_receipts, report_closed};
use super::{ROWS_PER_STATEMENT, Result, Store, in_list, unreadable};
use crate::model::{
    CHANNEL_SMS, ChannelSet, Receipt, ReceiptKind, Recipient, Slot, TerminalEvent,
    TerminalEventKind,
};
use crate::packed;

/// What happened to one recipient of a batch row: one byte of `states`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(super) enum State {
    Held = 0,
    /// Pushed to the terminal, not yet confirmed.
    Pushed = 1,
    Delivered = 2,
    Opened = 3,
    Expired = 4,
    Unsupported = 5,
    /// The person left the hub before it was pushed.
    Dropped = 6,
    /// The network (an SMSC, a mail server) refused it or reported it
    /// undeliverable.
    Failed = 7,
}

impl State {
    pub(super) fn of(byte: u8) -> Self {
        match byte {
            0 => Self::Held,
            1 => Self::Pushed,
            2 => Self::Delivered,
            3 => Self::Opened,
            4 => Self::Expired,
            5 => Self::Unsupported,
            7 => Self::Failed,
            _ => Self::Dropped,
        }
    }

    /// Not yet confirmed by the terminal nor closed.
    fn is_open(self) -> bool {
        self < Self::Delivered
    }
}

/// A batch row with what changing its states needs.
#[derive(sqlx::FromRow)]
pub(super) struct StateRow {
    seq: i64,
    message_id: String,
    single_attempt: bool,
    sms_segments: i64,
    recipients: Vec<u8>,
    states: Vec<u8>,
}

/// One recipient whose state changed, with what its receipt and counts need.
#[derive(Debug)]
pub(super) struct Moved {
    pub(super) delivery_id: u64,
    pub(super) message_id: String,
    pub(super) user_id: String,
    pub(super) channel: i64,
    /// SMS parts this delivery took (0 off SMS).
    pub(super) sms_segments: i64,
    pub(super) single_attempt: bool,
    pub(super) to: State,
}

impl Store {
    /// Deliveries the carrier itself cannot put on their channel (no e-mail
    /// address, no SNS handle): unsupported, reported to the relay.
    pub async fn mark_unsupported(&self, slots: &[Slot], now: i64) -> Result<usize> {
        let (mut tx, _turn) = self.begin_write().await?;
        let wanted = by_row(slots);
        let rows = rows_by_seq(&mut tx, &wanted).await?;
        let moved = change_states(&mut tx, rows, |slot, _, state| {
            (state == State::Held && wanted_slot(&wanted, slot)).then_some(State::Unsupported)
        })
        .await?;
        let queued = report_closed(&mut tx, moved, ReceiptKind::Unsupported, now).await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Drops the messages still held (not yet pushed) for these people;
    /// returns how many.
    pub async fn drop_held(&self, user_ids: &[&str]) -> Result<u64> {
        if user_ids.is_empty() {
            return Ok(0);
        }
        let leaving: HashSet<&str> = user_ids.iter().copied().collect();
        let (mut tx, _turn) = self.begin_write().await?;
        let rows = state_rows(&mut tx, "held > 0", &[]).await?;
        let moved = change_states(&mut tx, rows, |_, recipient, state| {
            (state == State::Held && leaving.contains(recipient.user_id.as_str()))
                .then_some(State::Dropped)
        })
        .await?;
        tx.commit().await?;
        Ok(moved.len() as u64)
    }

    pub async fn mark_pushed(&self, slots: &[Slot]) -> Result<()> {
        let (mut tx, _turn) = self.begin_write().await?;
        let wanted = by_row(slots);
        let rows = rows_by_seq(&mut tx, &wanted).await?;
        change_states(&mut tx, rows, |slot, _, state| {
            (state == State::Held && wanted_slot(&wanted, slot)).then_some(State::Pushed)
        })
        .await?;
        tx.commit().await
    }

    /// Pushed but unconfirmed deliveries of `endpoint`'s users are pushed
    /// again — those on channels a gateway serves wait for the network's
    /// report instead.
    pub async fn requeue_unconfirmed(&self, endpoint: &str, gateways: ChannelSet) -> Result<()> {
        let attached = self.attached.read().expect("attachments lock").clone();
        let (mut tx, _turn) = self.begin_write().await?;
        let rows = state_rows(&mut tx, "pushed > 0", &[]).await?;
        change_states(&mut tx, rows, |_, recipient, state| {
            (state == State::Pushed
                && !gateways.contains(recipient.channel)
                && attached.get(&recipient.user_id).map(|e| &**e) == Some(endpoint))
            .then_some(State::Held)
        })
        .await?;
        tx.commit().await
    }

    /// Applies terminal events in their order: each delivery moves forward
    /// at most once per state, each move adds one receipt to the outbox (a
    /// read of a delivery not yet confirmed is its delivery too); sends and
    /// opens are counted once per person and message, however many channels
    /// reached them. Events about deliveries this carrier does not hold are
    /// ignored. Returns how many receipts were queued.
    pub async fn apply_terminal_events(&self, events: &[TerminalEvent]) -> Result<usize> {
        if events.is_empty() {
            return Ok(0);
        }
        let (mut tx, _turn) = self.begin_write().await?;
        let queued = apply_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Expires deliveries whose expiry passed before the terminal confirmed
    /// them: they are never delivered later.
    pub async fn expire(&self, now: i64) -> Result<usize> {
        let (mut tx, _turn) = self.begin_write().await?;
        let rows = state_rows(
            &mut tx,
            "(held > 0 OR pushed > 0) AND expires_at <= $1",
            &[now],
        )
        .await?;
        let moved = change_states(&mut tx, rows, |_, _, state| {
            state.is_open().then_some(State::Expired)
        })
        .await?;
        let queued = report_closed(&mut tx, moved, ReceiptKind::Expired, now).await?;
        tx.commit().await?;
        Ok(queued)
    }
}

/// Applies events in their order inside `tx` (see
/// [`Store::apply_terminal_events`]); returns how many receipts were queued.
pub(super) async fn apply_events(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    events: &[TerminalEvent],
) -> Result<usize> {
    let decoded = rows_holding(tx, events).await?;
    let mut place: HashMap<(&str, u64), (usize, usize)> = HashMap::new();
    for (r, (row, recipients)) in decoded.iter().enumerate() {
        for (i, recipient) in recipients.iter().enumerate() {
            place.insert((row.message_id.as_str(), recipient.delivery_id), (r, i));
        }
    }
    let mut states: Vec<Vec<u8>> = decoded.iter().map(|(row, _)| row.states.clone()).collect();
    let mut moved: Vec<(Moved, &TerminalEvent)> = Vec::new();
    for event in events {
        let Some(&(r, i)) = place.get(&(event.message_id.as_str(), event.delivery_id)) else {
            continue;
        };
        let state = State::of(states[r][i]);
        let steps: &[State] = match (event.kind, state) {
            (TerminalEventKind::Delivered, s) if s.is_open() => &[State::Delivered],
            (TerminalEventKind::Read, s) if s.is_open() => &[State::Delivered, State::Opened],
            (TerminalEventKind::Read, State::Delivered) => &[State::Opened],
            (TerminalEventKind::Unsupported, s) if s.is_open() => &[State::Unsupported],
            (TerminalEventKind::Failed, s) if s.is_open() => &[State::Failed],
            (TerminalEventKind::Bounced, s) if s.is_open() || s == State::Delivered => {
                &[State::Failed]
            }
            _ => &[],
        };
        let (row, recipients) = &decoded[r];
        for &to in steps {
            states[r][i] = to as u8;
            moved.push((moved_one(row, &recipients[i], to), event));
        }
    }
    let changed: Vec<(i64, Vec<u8>)> = decoded
        .iter()
        .zip(states)
        .filter(|((row, _), states)| row.states != *states)
        .map(|((row, _), states)| (row.seq, states))
        .collect();
    write_states(tx, &changed).await?;
    let receipts: Vec<Receipt> = moved
        .iter()
        .map(|(m, event)| Receipt {
            seq: 0,
            delivery_id: m.delivery_id,
            message_id: m.message_id.clone(),
            user_id: m.user_id.clone(),
            kind: receipt_kind(m.to),
            channel: m.channel,
            at: event.at,
            region: event.region.clone(),
            trace_parent: event.trace_parent.clone(),
        })
        .collect();
    queue_receipts(tx, &receipts).await?;
    let moved: Vec<Moved> = moved.into_iter().map(|(m, _)| m).collect();
    count_moves(tx, &moved).await?;
    Ok(receipts.len())
}

const STATE_COLUMNS: &str = "seq, message_id, single_attempt, sms_segments, recipients, states";

/// The batch rows matching `condition` (binding `$1`… to `binds`), read in
/// `tx` so their states are current.
pub(super) async fn state_rows(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    condition: &str,
    binds: &[i64],
) -> Result<Vec<StateRow>> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM batches WHERE {condition}");
    let mut query = sqlx::query_as::<_, StateRow>(sqlx::AssertSqlSafe(sql));
    for bind in binds {
        query = query.bind(*bind);
    }
    query.fetch_all(&mut **tx).await
}

/// Slots grouped by row.
fn by_row(slots: &[Slot]) -> BTreeMap<i64, HashSet<u32>> {
    let mut rows: BTreeMap<i64, HashSet<u32>> = BTreeMap::new();
    for slot in slots {
        rows.entry(slot.row).or_default().insert(slot.index);
    }
    rows
}

fn wanted_slot(wanted: &BTreeMap<i64, HashSet<u32>>, slot: Slot) -> bool {
    wanted
        .get(&slot.row)
        .is_some_and(|indexes| indexes.contains(&slot.index))
}

pub(super) async fn rows_by_seq(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    wanted: &BTreeMap<i64, HashSet<u32>>,
) -> Result<Vec<StateRow>> {
    let seqs: Vec<i64> = wanted.keys().copied().collect();
    let mut rows = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(format!("SELECT {STATE_COLUMNS} FROM batches WHERE seq"));
        in_list(&mut query, chunk.iter().copied());
        rows.extend(
            query
                .build_query_as::<StateRow>()
                .fetch_all(&mut **tx)
                .await?,
        );
    }
    Ok(rows)
}

/// Moves each recipient of `rows` to the state `change` names (`None`: left
/// as it is), writes back the rows that changed, and returns what moved.
pub(super) async fn change_states(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    rows: Vec<StateRow>,
    mut change: impl FnMut(Slot, &Recipient, State) -> Option<State>,
) -> Result<Vec<Moved>> {
    let mut moved = Vec::new();
    let mut changed = Vec::new();
    for row in rows {
        let recipients = packed::decode_recipients(&row.recipients).map_err(unreadable)?;
        let mut states = row.states.clone();
        for (index, recipient) in recipients.iter().enumerate() {
            let slot = Slot {
                row: row.seq,
                index: index as u32,
            };
            if let Some(to) = change(slot, recipient, State::of(states[index])) {
                states[index] = to as u8;
                moved.push(moved_one(&row, recipient, to));
            }
        }
        if states != row.states {
            changed.push((row.seq, states));
        }
    }
    write_states(tx, &changed).await?;
    Ok(moved)
}

/// The batch rows holding the deliveries `events` are about, with their
/// recipients decoded.
async fn rows_holding(
    tx: &mut sqlx::SqliteConnection,
    events: &[TerminalEvent],
) -> Result<Vec<(StateRow, Vec<Recipient>)>> {
    // Each message's id range: its rows are found by message and range.
    let mut ranges: HashMap<&str, (u64, u64)> = HashMap::new();
    for event in events {
        let range = ranges
            .entry(event.message_id.as_str())
            .or_insert((event.delivery_id, event.delivery_id));
        range.0 = range.0.min(event.delivery_id);
        range.1 = range.1.max(event.delivery_id);
    }
    let ranges: Vec<(&str, (u64, u64))> = ranges.into_iter().collect();
    let mut rows: Vec<StateRow> = Vec::new();
    for chunk in ranges.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "SELECT b.seq, b.message_id, b.single_attempt, b.sms_segments, b.recipients, b.states
             FROM batches b JOIN (",
        );
        query.push_values(chunk, |mut row, (message_id, (lo, hi))| {
            row.push_bind(*message_id)
                .push_bind(*lo as i64)
                .push_bind(*hi as i64);
        });
        query.push(
            ") AS v ON b.message_id = v.column1 AND b.min_id <= v.column3 AND b.max_id >= v.column2",
        );
        rows.extend(
            query
                .build_query_as::<StateRow>()
                .fetch_all(&mut *tx)
                .await?,
        );
    }
    let mut decoded: Vec<(StateRow, Vec<Recipient>)> = Vec::with_capacity(rows.len());
    for row in rows {
        let recipients = packed::decode_recipients(&row.recipients).map_err(unreadable)?;
        decoded.push((row, recipients));
    }
    Ok(decoded)
}

/// Writes rows' new states with their held and pushed counts.
async fn write_states(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    changed: &[(i64, Vec<u8>)],
) -> Result<()> {
    for chunk in changed.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(
            "UPDATE batches SET states = v.column2, held = v.column3, pushed = v.column4 FROM (",
        );
        query.push_values(chunk, |mut row, (seq, states)| {
            let count = |state: State| states.iter().filter(|&&s| s == state as u8).count() as i64;
            row.push_bind(*seq)
                .push_bind(states.clone())
                .push_bind(count(State::Held))
                .push_bind(count(State::Pushed));
        });
        query.push(") AS v WHERE batches.seq = v.column1");
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

fn moved_one(row: &StateRow, recipient: &Recipient, to: State) -> Moved {
    Moved {
        delivery_id: recipient.delivery_id,
        message_id: row.message_id.clone(),
        user_id: recipient.user_id.clone(),
        channel: recipient.channel,
        sms_segments: if recipient.channel == CHANNEL_SMS {
            row.sms_segments
        } else {
            0
        },
        single_attempt: row.single_attempt,
        to,
    }
}

/// The receipt a move to `state` sends the relay.
fn receipt_kind(state: State) -> ReceiptKind {
    match state {
        State::Delivered => ReceiptKind::Delivered,
        State::Opened => ReceiptKind::Opened,
        State::Expired => ReceiptKind::Expired,
        State::Unsupported => ReceiptKind::Unsupported,
        State::Held | State::Pushed | State::Dropped | State::Failed => ReceiptKind::Failed,
    }
}
