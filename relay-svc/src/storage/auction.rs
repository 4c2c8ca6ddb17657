//! Auction slots and sealed bids. Every bid and the close take the slot's
//! row first (`UPDATE auction_slots … WHERE state = 0`), so on either backend
//! a bid either commits before the close reads the bids or is refused as
//! late; winners' capacity is drawn by one conditional `UPDATE` per message,
//! so concurrent sends never draw more than was awarded. How capacity is
//! allocated is `crate::auction`'s business.

use super::{Store, WritePool, is_unique_violation, on_pool, on_write, transaction_steps};
use crate::auction::{self, BidRow, BidState, NewSlot, Rule, SealedBid, SlotRow};
use crate::error::{Error, Result};
use crate::pricing::Yen;
use crate::targeting::Channel;

type SlotTuple = (
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
);

const SLOT_COLUMNS: &str = "id, channel, starts_at, ends_at, capacity, closes_at, reserve, rule, state, bids, awarded, clearing_price";

fn slot_row(row: SlotTuple) -> SlotRow {
    let (
        id,
        channel,
        starts_at,
        ends_at,
        capacity,
        closes_at,
        reserve,
        rule,
        state,
        bids,
        awarded,
        clearing,
    ) = row;
    SlotRow {
        slot_id: id,
        slot: NewSlot {
            channel: Channel::from_number(channel).unwrap_or(Channel::Sms),
            starts_at,
            ends_at,
            capacity,
            closes_at,
            reserve,
            rule: Rule::parse(&rule).unwrap_or(Rule::PayAsBid),
        },
        closed: state != 0,
        bids,
        awarded,
        clearing_price: clearing,
    }
}

type BidTuple = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

const BID_COLUMNS: &str = "b.id, b.slot_id, b.quantity, b.price, b.placed_at, b.state, b.awarded, b.pays, b.used, s.channel, s.starts_at, s.ends_at";

fn bid_row(row: BidTuple) -> BidRow {
    let (
        id,
        slot_id,
        quantity,
        price,
        placed_at,
        state,
        awarded,
        pays,
        used,
        channel,
        starts_at,
        ends_at,
    ) = row;
    BidRow {
        bid_id: id,
        slot_id,
        quantity,
        price,
        placed_at,
        state: match state {
            1 => BidState::Won,
            2 => BidState::Lost,
            _ => BidState::Sealed,
        },
        awarded,
        pays,
        used,
        channel: Channel::from_number(channel).unwrap_or(Channel::Sms),
        starts_at,
        ends_at,
    }
}

/// A closed slot's outcome, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub slot_id: String,
    pub bids: usize,
    pub awarded: i64,
    pub clearing_price: Option<Yen>,
}

impl Store {
    /// Opens a slot; one that overlaps another slot of the same channel is refused.
    pub async fn open_slot(&self, slot_id: &str, slot: &NewSlot, now: i64) -> Result<SlotRow> {
        let channel = Channel::number(Some(slot.channel));
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let overlapping: Option<String> = sqlx::query_scalar(
                "SELECT id FROM auction_slots WHERE channel = $1 AND starts_at < $3 AND ends_at > $2 LIMIT 1",
            )
            .bind(channel)
            .bind(slot.starts_at)
            .bind(slot.ends_at)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(other) = overlapping {
                return Err(Error::already_exists(
                    "starts_at",
                    format!("overlaps slot {other} on the same channel"),
                ));
            }
            sqlx::query(
                "INSERT INTO auction_slots (id, channel, starts_at, ends_at, capacity, closes_at, reserve, rule, state, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
            )
            .bind(slot_id)
            .bind(channel)
            .bind(slot.starts_at)
            .bind(slot.ends_at)
            .bind(slot.capacity)
            .bind(slot.closes_at)
            .bind(slot.reserve)
            .bind(slot.rule.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<(), Error>(())
        })?;
        on_pool!(self, _pool, groups => groups.slots.forget());
        Ok(SlotRow {
            slot_id: slot_id.to_owned(),
            slot: slot.clone(),
            closed: false,
            bids: 0,
            awarded: 0,
            clearing_price: None,
        })
    }

    /// The slots of any of `channels` (none: every channel) that a message
    /// going at `now` and expiring at `until` may meet — not ended at `now`,
    /// starting before `until` — by start, from the slots read lately
    /// (`slot_cache.rs`).
    pub async fn slots_for_send(
        &self,
        channels: &[Channel],
        now: i64,
        until: i64,
    ) -> Result<Vec<SlotRow>> {
        let cached = on_pool!(self, _pool, groups => groups.slots.get(now));
        let slots = match cached {
            Ok(slots) => slots,
            Err(generation) => {
                let read = self.slots_overlapping(&[], now, i64::MAX).await?;
                on_pool!(self, _pool, groups => groups.slots.keep(generation, now, read))
            }
        };
        Ok(slots
            .iter()
            .filter(|s| s.slot.starts_at < until && s.slot.ends_at > now)
            .filter(|s| channels.is_empty() || channels.contains(&s.slot.channel))
            .cloned()
            .collect())
    }

    /// Slots of any of `channels` (none: every channel) whose window
    /// overlaps `[from, until)`, by start.
    pub async fn slots_overlapping(
        &self,
        channels: &[Channel],
        from: i64,
        until: i64,
    ) -> Result<Vec<SlotRow>> {
        let sql = format!(
            "SELECT {SLOT_COLUMNS} FROM auction_slots WHERE starts_at < $2 AND ends_at > $1 ORDER BY starts_at, id"
        );
        let rows: Vec<SlotTuple> = on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(until)
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(slot_row)
            .filter(|s| channels.is_empty() || channels.contains(&s.slot.channel))
            .collect())
    }

    /// Places a sealed bid; refused when the slot does not exist, has closed
    /// (or its close time has passed), or the price is below its reserve.
    pub async fn place_bid(
        &self,
        enterprise_id: &str,
        bid_id: &str,
        slot_id: &str,
        quantity: i64,
        price: Yen,
        now: i64,
    ) -> Result<BidRow> {
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // Takes the slot's row: a concurrent close waits for this bid, or
            // this bid waits for the close and then finds the slot closed.
            let seq: Option<(i64, i64, i64)> = sqlx::query_as(
                "UPDATE auction_slots SET bids = bids + 1 WHERE id = $1 AND state = 0 AND closes_at > $2
                 RETURNING bids, reserve, capacity",
            )
            .bind(slot_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((seq, reserve, capacity)) = seq else {
                let exists: Option<i64> = sqlx::query_scalar("SELECT closes_at FROM auction_slots WHERE id = $1")
                    .bind(slot_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                return Err(match exists {
                    None => Error::not_found("slot_id", "no such auction slot"),
                    Some(_) => Error::refused("slot_id", "bidding on this slot has closed"),
                });
            };
            if price < reserve {
                return Err(Error::invalid("price", format!("below the slot's reserve price of {reserve} yen")));
            }
            if quantity > capacity {
                return Err(Error::invalid("quantity", format!("more than the slot's capacity of {capacity} messages")));
            }
            let inserted = sqlx::query(
                "INSERT INTO bids (id, slot_id, enterprise_id, seq, quantity, price, placed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(bid_id)
            .bind(slot_id)
            .bind(enterprise_id)
            .bind(seq)
            .bind(quantity)
            .bind(price)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(error) if is_unique_violation(&error) => {
                    return Err(Error::already_exists("bid_id", "already placed"));
                }
                Err(error) => return Err(error.into()),
            }
            tx.commit().await?;
            Ok::<(), Error>(())
        })?;
        self.bid(enterprise_id, bid_id)
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("placed bid vanished")))
    }

    /// One of the enterprise's bids; another enterprise's is "not found".
    pub async fn bid(&self, enterprise_id: &str, bid_id: &str) -> Result<Option<BidRow>> {
        let sql = format!(
            "SELECT {BID_COLUMNS} FROM bids b JOIN auction_slots s ON s.id = b.slot_id
             WHERE b.id = $1 AND b.enterprise_id = $2"
        );
        let row: Option<BidTuple> = on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(bid_id)
            .bind(enterprise_id)
            .fetch_optional(pool)
            .await)?;
        Ok(row.map(bid_row))
    }

    /// The enterprise's bids on slots that have not ended by `now`, newest first.
    pub async fn bids(&self, enterprise_id: &str, now: i64) -> Result<Vec<BidRow>> {
        let sql = format!(
            "SELECT {BID_COLUMNS} FROM bids b JOIN auction_slots s ON s.id = b.slot_id
             WHERE b.enterprise_id = $1 AND s.ends_at > $2 ORDER BY b.placed_at DESC, b.id"
        );
        let rows: Vec<BidTuple> = on_pool!(self, pool => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(enterprise_id)
            .bind(now)
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(bid_row).collect())
    }

    /// Closes every slot whose close time has come: allocates its capacity,
    /// marks winners and losers, writes the winners' awards to the ledger and
    /// publishes the clearing price — one transaction per slot.
    pub async fn close_due_slots(&self, now: i64) -> Result<Vec<Closed>> {
        let due: Vec<String> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM auction_slots WHERE state = 0 AND closes_at <= $1 ORDER BY closes_at, id",
        )
        .bind(now)
        .fetch_all(pool)
        .await)?;
        let mut closed = Vec::with_capacity(due.len());
        for slot_id in due {
            if let Some(done) = self.close_slot(&slot_id, now).await? {
                closed.push(done);
            }
        }
        Ok(closed)
    }

    async fn close_slot(&self, slot_id: &str, now: i64) -> Result<Option<Closed>> {
        on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let slot: Option<(i64, i64, i64, String)> = sqlx::query_as(
                "UPDATE auction_slots SET state = 1 WHERE id = $1 AND state = 0
                 RETURNING channel, capacity, reserve, rule",
            )
            .bind(slot_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((channel, capacity, reserve, rule)) = slot else {
                tx.rollback().await?;
                return Ok(None);
            };
            let bids: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
                "SELECT id, enterprise_id, seq, quantity, price FROM bids WHERE slot_id = $1 ORDER BY seq",
            )
            .bind(slot_id)
            .fetch_all(&mut *tx)
            .await?;
            let sealed: Vec<SealedBid> = bids
                .iter()
                .map(|(id, _, seq, quantity, price)| SealedBid {
                    bid_id: id.clone(),
                    seq: *seq,
                    quantity: *quantity,
                    price: *price,
                })
                .collect();
            let rule = Rule::parse(&rule).unwrap_or(Rule::PayAsBid);
            let allocation = auction::allocate(&sealed, capacity, reserve, rule);
            for award in &allocation.awards {
                sqlx::query("UPDATE bids SET state = $2, awarded = $3, pays = $4 WHERE id = $1")
                    .bind(&award.bid_id)
                    .bind(if award.quantity > 0 { 1_i64 } else { 2 })
                    .bind(award.quantity)
                    .bind(award.pays)
                    .execute(&mut *tx)
                    .await?;
                if award.quantity > 0 && award.pays > 0 {
                    let enterprise = bids
                        .iter()
                        .find(|(id, ..)| *id == award.bid_id)
                        .map(|(_, enterprise, ..)| enterprise.as_str())
                        .unwrap_or_default();
                    sqlx::query(
                        "INSERT INTO ledger (enterprise_id, kind, message_id, bid_id, channel, slot, carrier_id,
                                             quantity, unit_price, amount, at, recorded_at)
                         VALUES ($1, 'award', '', $2, $3, -1, '', $4, $5, $6, $7, $7)",
                    )
                    .bind(enterprise)
                    .bind(&award.bid_id)
                    .bind(channel)
                    .bind(award.quantity)
                    .bind(award.pays)
                    .bind(award.quantity * award.pays)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query("UPDATE auction_slots SET awarded = $2, clearing_price = $3 WHERE id = $1")
                .bind(slot_id)
                .bind(allocation.awarded)
                .bind(allocation.clearing_price)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<Option<Closed>, Error>(Some(Closed {
                slot_id: slot_id.to_owned(),
                bids: bids.len(),
                awarded: allocation.awarded,
                clearing_price: allocation.clearing_price,
            }))
        })
    }
}

transaction_steps! {
    /// Spending a winning bid's capacity.
    pub(crate) trait BidSteps {
        /// Draws `recipients` messages from winning bid `bid_id` of
        /// `enterprise_id`; refused when that is more than is left.
        async fn draw_on_bid(
            &mut self,
            enterprise_id: &str,
            bid_id: &str,
            recipients: i64,
        ) -> Result<()> {
            let drawn = sqlx::query(
                "UPDATE bids SET used = used + $3
                 WHERE id = $1 AND enterprise_id = $2 AND state = 1 AND used + $3 <= awarded",
            )
            .bind(bid_id)
            .bind(enterprise_id)
            .bind(recipients)
            .execute(&mut *self)
            .await?
            .rows_affected();
            if drawn == 0 && recipients > 0 {
                let left: Option<i64> = sqlx::query_scalar(
                    "SELECT awarded - used FROM bids WHERE id = $1 AND enterprise_id = $2 AND state = 1",
                )
                .bind(bid_id)
                .bind(enterprise_id)
                .fetch_optional(&mut *self)
                .await?;
                return Err(match left {
                    Some(left) => Error::exhausted(
                        "bid_id",
                        format!("the winning bid has {left} messages left; this message has {recipients} recipients"),
                    ),
                    None => Error::not_found("bid_id", "no such winning bid"),
                });
            }
            Ok(())
        }
    }
}
