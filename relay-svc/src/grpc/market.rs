//! The edge of pricing, billing and the auction, shared by `EnterpriseApi`
//! and `Admin`: rate cards, price tables, quotes, statements, revenue, slots
//! and bids in and out of their wire form, and the auction's terms for a
//! message about to be accepted.

use chukei_proto::clock::to_timestamp;
use chukei_proto::relay::v1 as pb;

use super::{Relay, channel_from_wire, required};
use crate::auction::{BidRow, BidState, NewSlot, Rule, SlotRow};
use crate::error::{Error, Result};
use crate::pricing::{self, Dynamic, Prices, RateCard, RateEntry};
use crate::service::Quoted;
use crate::storage::{LedgerDimension, LedgerSum, PriceTable};
use crate::targeting::{Channel, NewMessage};

/// Default evidence a slot needs before dynamic pricing moves its price.
const DEFAULT_MIN_DELIVERIES: i64 = 100;

/// Recently ended slots stay listed this long, with their clearing prices.
const ENDED_SLOTS_SHOWN_MS: i64 = 7 * 24 * 3_600_000;

fn channel_to_wire(channel: Channel) -> i32 {
    Channel::number(Some(channel)) as i32
}

/// The rate card in a `SetRateCard`; errors name the entry and field.
pub(super) fn rate_card_from_wire(request: &pb::SetRateCardRequest) -> Result<RateCard> {
    if request.entries.is_empty() {
        return Err(Error::invalid(
            "entries",
            "must price every channel at every hour",
        ));
    }
    if request.entries.len() > 4 * pricing::SLOTS {
        return Err(Error::invalid(
            "entries",
            "at most one entry per channel and hour",
        ));
    }
    let entries = request
        .entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let field = format!("entries[{index}].channel");
            Ok(RateEntry {
                channel: channel_from_wire(&field, entry.channel)?
                    .ok_or_else(|| Error::invalid(field, "is required"))?,
                from_hour: entry.from_hour,
                to_hour: entry.to_hour,
                prices: Prices {
                    delivered: entry.delivered_price,
                    opened: entry.opened_price,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dynamic = request.dynamic.as_ref().map(|d| Dynamic {
        floor_percent: i64::from(d.floor_percent),
        ceiling_percent: i64::from(d.ceiling_percent),
        min_deliveries: match d.min_deliveries {
            0 => DEFAULT_MIN_DELIVERIES,
            n => i64::from(n),
        },
    });
    RateCard::new(&entries, dynamic)
}

pub(super) fn price_table_to_wire(table: Option<PriceTable>) -> pb::PriceTable {
    let Some(table) = table else {
        return pb::PriceTable::default();
    };
    let mut cells = Vec::with_capacity(pricing::PRICED_CHANNELS.len() * pricing::SLOTS);
    for channel in pricing::PRICED_CHANNELS {
        let row = pricing::channel_index(Some(channel));
        for slot in 0..pricing::SLOTS {
            let prices = table.prices[row][slot];
            let base = table.card.base[row][slot];
            cells.push(pb::PriceCell {
                channel: channel_to_wire(channel),
                slot: slot as u32,
                delivered_price: prices.delivered,
                opened_price: prices.opened,
                base_delivered_price: base.delivered,
                base_opened_price: base.opened,
                open_rate: table.rates[row][slot].map(|permille| permille as f64 / 1000.0),
            });
        }
    }
    pb::PriceTable {
        version: table.id as u64,
        zone: table.zone,
        published_at: Some(to_timestamp(table.created_at)),
        dynamic: table.card.dynamic.is_some(),
        cells,
    }
}

impl Relay {
    /// The price table in force, on the wire.
    pub(super) async fn prices(&self) -> Result<pb::PriceTable> {
        Ok(price_table_to_wire(self.store.price_table(None).await?))
    }

    /// What `message` would cost, on the wire.
    pub(super) async fn quote_to_wire(
        &self,
        enterprise_id: &str,
        message: &NewMessage,
    ) -> Result<pb::Quote> {
        let Quoted { quote, zone } = self.quote(enterprise_id, message).await?;
        Ok(pb::Quote {
            recipients: quote.recipients,
            price_table: quote.price_table.unwrap_or(0) as u64,
            lines: quote
                .lines
                .iter()
                .map(|line| pb::QuoteLine {
                    channel: channel_to_wire(line.channel),
                    slot: line.slot as u32,
                    delivered_price: line.prices.delivered,
                    opened_price: line.prices.opened,
                })
                .collect(),
            delivered_low: quote.delivered_low,
            delivered_high: quote.delivered_high,
            opened_low: quote.opened_low,
            opened_high: quote.opened_high,
            prepaid: quote.prepaid,
            zone,
        })
    }

    /// `enterprise_id`'s statement for `month`: its ledger grouped by kind,
    /// channel, slot and unit price; the total is the ledger's own sum.
    pub(super) async fn statement(
        &self,
        enterprise_id: &str,
        month: &str,
    ) -> Result<pb::Statement> {
        let (start, end) = pricing::month_bounds("month", month, &self.market.zone)?;
        let by = [
            LedgerDimension::Kind,
            LedgerDimension::Channel,
            LedgerDimension::Slot,
            LedgerDimension::UnitPrice,
        ];
        let lines = self
            .store
            .ledger_sums(Some(enterprise_id), start, end, &by)
            .await?;
        let total = self
            .store
            .ledger_sums(Some(enterprise_id), start, end, &[])
            .await?
            .first()
            .map_or(0, |sum| sum.amount);
        Ok(pb::Statement {
            month: month.to_owned(),
            zone: self.market.zone_name.to_string(),
            lines: lines
                .into_iter()
                .map(
                    |LedgerSum {
                         key,
                         quantity,
                         amount,
                     }| {
                        let number = |i: usize| key[i].parse::<i64>().unwrap_or(0);
                        pb::StatementLine {
                            kind: key[0].clone(),
                            channel: number(1) as i32,
                            slot: (number(2) >= 0).then_some(number(2) as u32),
                            quantity,
                            unit_price: number(3),
                            amount,
                        }
                    },
                )
                .collect(),
            total,
        })
    }

    /// The hub's ledger for `month` grouped by `by`.
    pub(super) async fn revenue(&self, request: &pb::GetRevenueRequest) -> Result<pb::Revenue> {
        let (start, end) = pricing::month_bounds("month", &request.month, &self.market.zone)?;
        let mut by = Vec::with_capacity(request.by.len());
        let mut columns = Vec::with_capacity(request.by.len());
        for (index, wire) in request.by.iter().enumerate() {
            let field = format!("by[{index}]");
            let (dimension, name) = match pb::RevenueDimension::try_from(*wire) {
                Ok(pb::RevenueDimension::Carrier) => (LedgerDimension::Carrier, "carrier"),
                Ok(pb::RevenueDimension::Channel) => (LedgerDimension::Channel, "channel"),
                Ok(pb::RevenueDimension::Slot) => (LedgerDimension::Slot, "slot"),
                Ok(pb::RevenueDimension::Kind) => (LedgerDimension::Kind, "kind"),
                Ok(pb::RevenueDimension::Enterprise) => (LedgerDimension::Enterprise, "enterprise"),
                _ => return Err(Error::invalid(field, format!("unknown dimension {wire}"))),
            };
            if by.contains(&dimension) {
                return Err(Error::invalid(field, format!("{name} is already listed")));
            }
            by.push(dimension);
            columns.push(name.to_owned());
        }
        let rows = self.store.ledger_sums(None, start, end, &by).await?;
        let total = self
            .store
            .ledger_sums(None, start, end, &[])
            .await?
            .first()
            .map_or(0, |sum| sum.amount);
        Ok(pb::Revenue {
            columns,
            rows: rows
                .into_iter()
                .map(|row| pb::RevenueRow {
                    key: row.key,
                    quantity: row.quantity,
                    amount: row.amount,
                })
                .collect(),
            total,
        })
    }

    /// Slots still to end, and those ended in the last week.
    pub(super) async fn list_slots(&self, operator: bool) -> Result<pb::ListAuctionSlotsResponse> {
        let now = self.clock.now_ms();
        let slots = self
            .store
            .slots_overlapping(&[], now - ENDED_SLOTS_SHOWN_MS, i64::MAX)
            .await?;
        Ok(pb::ListAuctionSlotsResponse {
            slots: slots
                .into_iter()
                .map(|slot| slot_to_wire(slot, operator))
                .collect(),
        })
    }
}

fn rule_to_wire(rule: Rule) -> pb::PricingRule {
    match rule {
        Rule::PayAsBid => pb::PricingRule::PayAsBid,
        Rule::Uniform => pb::PricingRule::Uniform,
    }
}

pub(super) fn slot_to_wire(row: SlotRow, operator: bool) -> pb::AuctionSlot {
    pb::AuctionSlot {
        slot_id: row.slot_id,
        channel: channel_to_wire(row.slot.channel),
        starts_at: Some(to_timestamp(row.slot.starts_at)),
        ends_at: Some(to_timestamp(row.slot.ends_at)),
        capacity: row.slot.capacity as u64,
        closes_at: Some(to_timestamp(row.slot.closes_at)),
        reserve_price: row.slot.reserve,
        rule: rule_to_wire(row.slot.rule) as i32,
        closed: row.closed,
        awarded: row.awarded as u64,
        clearing_price: row.clearing_price,
        bids: if operator { row.bids as u64 } else { 0 },
    }
}

pub(super) fn bid_to_wire(bid: BidRow) -> pb::Bid {
    pb::Bid {
        bid_id: bid.bid_id,
        slot_id: bid.slot_id,
        quantity: bid.quantity as u64,
        price: bid.price,
        placed_at: Some(to_timestamp(bid.placed_at)),
        state: match bid.state {
            BidState::Sealed => pb::BidState::Sealed,
            BidState::Won => pb::BidState::Won,
            BidState::Lost => pb::BidState::Lost,
        } as i32,
        awarded: bid.awarded as u64,
        pays: bid.pays,
        used: bid.used as u64,
        channel: channel_to_wire(bid.channel),
        starts_at: Some(to_timestamp(bid.starts_at)),
        ends_at: Some(to_timestamp(bid.ends_at)),
    }
}

/// A slot to open at `now`; errors name the field.
pub(super) fn slot_from_wire(request: &pb::OpenAuctionSlotRequest, now: i64) -> Result<NewSlot> {
    let channel = channel_from_wire("channel", request.channel)?
        .ok_or_else(|| Error::invalid("channel", "is required"))?;
    let instant = |field: &str, at: Option<&prost_types::Timestamp>| -> Result<i64> {
        match at {
            None => Err(Error::invalid(field, "is required")),
            Some(at) => Ok(chukei_proto::validate::instant(field, at)?),
        }
    };
    let starts_at = instant("starts_at", request.starts_at.as_ref())?;
    let ends_at = instant("ends_at", request.ends_at.as_ref())?;
    let closes_at = instant("closes_at", request.closes_at.as_ref())?;
    if ends_at <= starts_at {
        return Err(Error::invalid("ends_at", "must be after starts_at"));
    }
    if closes_at <= now {
        return Err(Error::invalid("closes_at", "must be in the future"));
    }
    if closes_at > starts_at {
        return Err(Error::invalid(
            "closes_at",
            "must not be after starts_at: bids close before the slot opens",
        ));
    }
    if request.capacity == 0 || request.capacity > 100_000_000 {
        return Err(Error::invalid("capacity", "must be 1..100000000 messages"));
    }
    if !(0..=pricing::MAX_UNIT_PRICE).contains(&request.reserve_price) {
        return Err(Error::invalid(
            "reserve_price",
            format!("must be 0..{} yen", pricing::MAX_UNIT_PRICE),
        ));
    }
    let rule = match pb::PricingRule::try_from(request.rule) {
        Ok(pb::PricingRule::PayAsBid) => Rule::PayAsBid,
        Ok(pb::PricingRule::Uniform) => Rule::Uniform,
        Ok(pb::PricingRule::Unspecified) => {
            return Err(Error::invalid("rule", "is required: pay_as_bid or uniform"));
        }
        Err(_) => {
            return Err(Error::invalid(
                "rule",
                format!("unknown rule {}", request.rule),
            ));
        }
    };
    Ok(NewSlot {
        channel,
        starts_at,
        ends_at,
        capacity: request.capacity as i64,
        closes_at,
        reserve: request.reserve_price,
        rule,
    })
}

/// A bid's quantity and price; both must be positive.
pub(super) fn bid_from_wire(request: &pb::PlaceBidRequest) -> Result<(String, i64, i64)> {
    let slot_id = required("slot_id", &request.slot_id, 64)?.to_owned();
    if request.quantity == 0 || request.quantity > 100_000_000 {
        return Err(Error::invalid("quantity", "must be 1..100000000 messages"));
    }
    if request.price <= 0 || request.price > pricing::MAX_UNIT_PRICE {
        return Err(Error::invalid(
            "price",
            format!("must be 1..{} yen per message", pricing::MAX_UNIT_PRICE),
        ));
    }
    Ok((slot_id, request.quantity as i64, request.price))
}
