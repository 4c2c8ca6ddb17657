//! Pricing, pure: the operator's rate card (yen per delivered and per opened
//! message, by channel × time slot), the price grid published from it —
//! optionally moved by each slot's open rate within operator-set bounds — the
//! slot an instant falls in, and a message's quote.
//!
//! Money is integer yen ([`Yen`]) everywhere: rates are per mille, factors
//! integer ratios, rounding half up; no floating point ever touches a price.
//! This module never reads storage; `storage::pricing` keeps the tables and
//! the ledger.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::policy::channel_name;
use crate::targeting::Channel;

/// An amount of money in yen (the minor unit: yen has no subunit).
pub type Yen = i64;

/// A time slot: the local hour of the day (0–23) in the price zone.
pub type Slot = usize;

pub const SLOTS: usize = 24;

/// The channels a rate card prices, in grid order.
pub const PRICED_CHANNELS: [Channel; 4] =
    [Channel::Rcs, Channel::Sms, Channel::Sns, Channel::Email];

/// The highest price one message may carry (a typo guard: ¥1,000,000).
pub const MAX_UNIT_PRICE: Yen = 1_000_000;

/// A channel's row in the grid; the carrier's default channel (unknown to
/// the relay, `None`) is priced as SMS, the default everywhere.
pub fn channel_index(channel: Option<Channel>) -> usize {
    match channel.unwrap_or(Channel::Sms) {
        Channel::Rcs => 0,
        Channel::Sms => 1,
        Channel::Sns => 2,
        Channel::Email => 3,
    }
}

/// What one message costs in one cell: when it is delivered, and again when it is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    pub delivered: Yen,
    pub opened: Yen,
}

/// Prices for every channel × slot.
pub type Grid = [[Prices; SLOTS]; 4];

/// One rate-card entry: a channel's prices for the local hours
/// `[from_hour, to_hour)`, wrapping past midnight when `to_hour <= from_hour`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateEntry {
    pub channel: Channel,
    pub from_hour: u32,
    pub to_hour: u32,
    pub prices: Prices,
}

impl RateEntry {
    fn hours(&self) -> impl Iterator<Item = Slot> {
        let span = (self.to_hour + 24 - self.from_hour - 1) % 24 + 1;
        (0..span).map(move |offset| ((self.from_hour + offset) % 24) as Slot)
    }
}

/// How far dynamic prices may move, and on how much evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dynamic {
    /// Lowest price, in percent of the base (1..=100).
    pub floor_percent: i64,
    /// Highest price, in percent of the base (100..=1000).
    pub ceiling_percent: i64,
    /// Deliveries a slot needs in the last 30 days before its rate counts.
    pub min_deliveries: i64,
}

/// The operator's rate card, validated into a complete grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateCard {
    pub base: Grid,
    pub dynamic: Option<Dynamic>,
}

impl RateCard {
    /// Checks the entries (each field named as `entries[i].…`) and that they
    /// price every channel at every hour exactly once.
    pub fn new(entries: &[RateEntry], dynamic: Option<Dynamic>) -> Result<Self> {
        let mut base = [[None::<Prices>; SLOTS]; 4];
        for (index, entry) in entries.iter().enumerate() {
            let field = |name: &str| format!("entries[{index}].{name}");
            if entry.from_hour > 23 {
                return Err(Error::invalid(field("from_hour"), "must be 0..23"));
            }
            if entry.to_hour > 24 {
                return Err(Error::invalid(field("to_hour"), "must be 0..24"));
            }
            for (name, price) in [
                ("delivered_price", entry.prices.delivered),
                ("opened_price", entry.prices.opened),
            ] {
                if !(0..=MAX_UNIT_PRICE).contains(&price) {
                    return Err(Error::invalid(
                        field(name),
                        format!("must be 0..{MAX_UNIT_PRICE} yen"),
                    ));
                }
            }
            let row = &mut base[channel_index(Some(entry.channel))];
            for hour in entry.hours() {
                if row[hour].is_some() {
                    return Err(Error::invalid(
                        field("from_hour"),
                        format!(
                            "{} {hour:02}:00 is already priced by an earlier entry",
                            channel_name(Some(entry.channel))
                        ),
                    ));
                }
                row[hour] = Some(entry.prices);
            }
        }
        for channel in PRICED_CHANNELS {
            if let Some(hour) = base[channel_index(Some(channel))]
                .iter()
                .position(Option::is_none)
            {
                return Err(Error::invalid(
                    "entries",
                    format!(
                        "{} {hour:02}:00-{:02}:00 has no price: every channel needs every hour",
                        channel_name(Some(channel)),
                        hour + 1
                    ),
                ));
            }
        }
        if let Some(dynamic) = dynamic {
            if !(1..=100).contains(&dynamic.floor_percent) {
                return Err(Error::invalid("dynamic.floor_percent", "must be 1..100"));
            }
            if !(100..=1000).contains(&dynamic.ceiling_percent) {
                return Err(Error::invalid(
                    "dynamic.ceiling_percent",
                    "must be 100..1000",
                ));
            }
            if dynamic.min_deliveries < 1 {
                return Err(Error::invalid(
                    "dynamic.min_deliveries",
                    "must be at least 1",
                ));
            }
        }
        Ok(Self {
            base: base.map(|row| row.map(Option::unwrap_or_default)),
            dynamic,
        })
    }
}

/// Deliveries and opens of one channel × slot over the pricing lookback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounts {
    pub delivered: i64,
    pub opened: i64,
}

/// The published grid: each cell's prices and the slot's open rate in per
/// mille (`None`: too little evidence, the base stands).
pub struct Repriced {
    pub prices: Grid,
    pub rates: [[Option<i64>; SLOTS]; 4],
}

/// Dynamic prices: each cell's base times its slot's open rate over its
/// channel's rate across all hours, clamped to `[floor, ceiling]` percent of
/// the base. A slot with fewer than `min_deliveries` deliveries keeps the
/// base; so does everything when dynamic pricing is off.
pub fn reprice(card: &RateCard, counts: &[[SlotCounts; SLOTS]; 4]) -> Repriced {
    let mut repriced = Repriced {
        prices: card.base,
        rates: [[None; SLOTS]; 4],
    };
    for (row, channel_counts) in counts.iter().enumerate() {
        let delivered: i64 = channel_counts.iter().map(|c| c.delivered).sum();
        let opened: i64 = channel_counts.iter().map(|c| c.opened).sum();
        for (slot, cell) in channel_counts.iter().enumerate() {
            let enough = card
                .dynamic
                .is_some_and(|d| cell.delivered >= d.min_deliveries);
            if cell.delivered > 0 {
                repriced.rates[row][slot] = enough.then(|| per_mille(cell.opened, cell.delivered));
            }
            let (Some(dynamic), true) = (card.dynamic, enough && opened > 0) else {
                continue;
            };
            // factor = slot rate / channel rate, as the ratio num / den.
            let num = i128::from(cell.opened) * i128::from(delivered);
            let den = i128::from(cell.delivered) * i128::from(opened);
            let base = card.base[row][slot];
            repriced.prices[row][slot] = Prices {
                delivered: scaled(base.delivered, num, den, dynamic),
                opened: scaled(base.opened, num, den, dynamic),
            };
        }
    }
    repriced
}

/// `part / whole` in per mille, rounded half up.
pub fn per_mille(part: i64, whole: i64) -> i64 {
    if whole <= 0 {
        return 0;
    }
    ((i128::from(part) * 2000 + i128::from(whole)) / (2 * i128::from(whole))) as i64
}

/// `base × num / den` rounded half up, clamped to the dynamic bounds.
fn scaled(base: Yen, num: i128, den: i128, dynamic: Dynamic) -> Yen {
    let base = i128::from(base);
    let moved = (2 * base * num + den) / (2 * den);
    let floor = (base * i128::from(dynamic.floor_percent) + 50) / 100;
    let ceiling = (base * i128::from(dynamic.ceiling_percent) + 50) / 100;
    moved.clamp(floor, ceiling) as Yen
}

/// The slot (local hour in `zone`) of the instant `at_ms`.
pub fn slot_of(at_ms: i64, zone: &TimeZone) -> Slot {
    let at = Timestamp::from_millisecond(at_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    at.to_zoned(zone.clone()).hour() as Slot
}

/// The start of the local hour `at_ms` falls in: ledger lines are grouped
/// by it, so a statement period (local midnight to midnight) never splits one.
pub fn hour_start(at_ms: i64, zone: &TimeZone) -> i64 {
    let at = Timestamp::from_millisecond(at_ms).unwrap_or(Timestamp::UNIX_EPOCH);
    let zoned = at.to_zoned(zone.clone());
    let into_hour = i64::from(zoned.minute()) * 60_000
        + i64::from(zoned.second()) * 1_000
        + i64::from(zoned.millisecond());
    at_ms - into_hour
}

/// The slots touched by first sends in `[from, until)` (at least the slot
/// of `from`; at most a day's worth), in order.
pub fn slots_between(from: i64, until: i64, zone: &TimeZone) -> Vec<Slot> {
    let mut slots = vec![slot_of(from, zone)];
    let mut at = hour_start(from, zone) + 3_600_000;
    while at < until && slots.len() < SLOTS {
        let slot = slot_of(at, zone);
        if !slots.contains(&slot) {
            slots.push(slot);
        }
        at += 3_600_000;
    }
    slots
}

/// One channel × slot a quoted message may be charged in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuoteLine {
    pub channel: Channel,
    pub slot: Slot,
    pub prices: Prices,
}

/// What a message would cost: per-person prices in every cell its plan may
/// use, and totals if every recipient is delivered (and opens). With one
/// cell, low equals high and the charge equals the quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub recipients: u64,
    /// The price table version (`None`: no rate card, nothing is charged).
    pub price_table: Option<i64>,
    pub lines: Vec<QuoteLine>,
    pub delivered_low: Yen,
    pub delivered_high: Yen,
    pub opened_low: Yen,
    pub opened_high: Yen,
    /// Deliveries are prepaid by a winning bid's award.
    pub prepaid: bool,
}

impl Quote {
    /// Prices `recipients` on `grid` over the candidate `channels` (none:
    /// the carrier's default) and `slots`; a fan-out is one charge per person.
    pub fn new(
        recipients: u64,
        table: Option<(i64, &Grid)>,
        channels: &[Channel],
        slots: &[Slot],
        prepaid: bool,
    ) -> Self {
        let mut quote = Self {
            recipients,
            price_table: table.map(|(id, _)| id),
            lines: Vec::new(),
            delivered_low: 0,
            delivered_high: 0,
            opened_low: 0,
            opened_high: 0,
            prepaid,
        };
        let Some((_, grid)) = table else {
            return quote;
        };
        let channels: Vec<Option<Channel>> = if channels.is_empty() {
            vec![None]
        } else {
            channels.iter().copied().map(Some).collect()
        };
        for channel in &channels {
            for &slot in slots {
                let mut prices = grid[channel_index(*channel)][slot];
                if prepaid {
                    prices.delivered = 0;
                }
                quote.lines.push(QuoteLine {
                    channel: channel.unwrap_or(Channel::Sms),
                    slot,
                    prices,
                });
            }
        }
        let people = recipients as i64;
        let delivered = quote.lines.iter().map(|l| l.prices.delivered);
        quote.delivered_low = people * delivered.clone().min().unwrap_or(0);
        quote.delivered_high = people * delivered.max().unwrap_or(0);
        let opened = quote.lines.iter().map(|l| l.prices.opened);
        quote.opened_low = people * opened.clone().min().unwrap_or(0);
        quote.opened_high = people * opened.max().unwrap_or(0);
        quote
    }
}

/// The local-midnight bounds `[start, end)` of month `month` ("2026-11") in
/// `zone`, as unix ms.
pub fn month_bounds(field: &str, month: &str, zone: &TimeZone) -> Result<(i64, i64)> {
    let invalid = || Error::invalid(field, "must be a month like 2026-11");
    let (year, number) = month.split_once('-').ok_or_else(invalid)?;
    let year: i16 = year.parse().map_err(|_| invalid())?;
    let number: i8 = number.parse().map_err(|_| invalid())?;
    if year.to_string().len() != 4 || !(1..=12).contains(&number) || !(1970..=9998).contains(&year)
    {
        return Err(invalid());
    }
    let start = jiff::civil::date(year, number, 1);
    let end = start
        .checked_add(jiff::Span::new().months(1))
        .map_err(|_| invalid())?;
    let at = |date: jiff::civil::Date| -> Result<i64> {
        Ok(date
            .to_zoned(zone.clone())
            .map_err(|_| invalid())?
            .timestamp()
            .as_millisecond())
    };
    Ok((at(start)?, at(end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(delivered: Yen, opened: Yen) -> Vec<RateEntry> {
        PRICED_CHANNELS
            .iter()
            .map(|&channel| RateEntry {
                channel,
                from_hour: 0,
                to_hour: 0,
                prices: Prices { delivered, opened },
            })
            .collect()
    }

    #[test]
    fn a_card_must_price_every_hour_once() {
        let card = RateCard::new(&flat(3, 5), None).unwrap();
        assert_eq!(
            card.base[1][17],
            Prices {
                delivered: 3,
                opened: 5
            }
        );

        let mut entries = flat(3, 5);
        entries[1].to_hour = 18; // SMS 00–18 only
        let error = RateCard::new(&entries, None).unwrap_err().to_string();
        assert_eq!(
            error,
            "entries: SMS 18:00-19:00 has no price: every channel needs every hour"
        );

        entries.push(RateEntry {
            channel: Channel::Sms,
            from_hour: 17,
            to_hour: 2,
            prices: Prices {
                delivered: 9,
                opened: 9,
            },
        });
        let error = RateCard::new(&entries, None).unwrap_err().to_string();
        assert_eq!(
            error,
            "entries[4].from_hour: SMS 17:00 is already priced by an earlier entry"
        );

        entries.last_mut().unwrap().from_hour = 18;
        entries[1].from_hour = 2; // SMS 02–18 and 18–02
        let card = RateCard::new(&entries, None).unwrap();
        assert_eq!(card.base[1][23].delivered, 9);
        assert_eq!(card.base[1][1].delivered, 9);
        assert_eq!(card.base[1][2].delivered, 3);

        let mut negative = flat(3, 5);
        negative[2].prices.opened = -1;
        let error = RateCard::new(&negative, None).unwrap_err().to_string();
        assert!(error.starts_with("entries[2].opened_price: "), "{error}");
    }

    #[test]
    fn dynamic_prices_follow_the_slot_rate_within_bounds() {
        let dynamic = Dynamic {
            floor_percent: 50,
            ceiling_percent: 150,
            min_deliveries: 100,
        };
        let card = RateCard::new(&flat(10, 20), Some(dynamic)).unwrap();
        let mut counts = [[SlotCounts::default(); SLOTS]; 4];
        // SMS: 09:00 opens 30%, 20:00 opens 10%, 03:00 opens 100% of 10 (too few).
        counts[1][9] = SlotCounts {
            delivered: 1000,
            opened: 300,
        };
        counts[1][20] = SlotCounts {
            delivered: 1000,
            opened: 100,
        };
        counts[1][3] = SlotCounts {
            delivered: 10,
            opened: 10,
        };
        let repriced = reprice(&card, &counts);
        // Channel rate: 410 / 2010. 09:00: 10 × (300×2010)/(1000×410) = 14.707… → 15 (capped at 15).
        assert_eq!(
            repriced.prices[1][9],
            Prices {
                delivered: 15,
                opened: 29
            }
        );
        // 20:00: 10 × (100×2010)/(1000×410) = 4.90 → floor 5; opened 9.80 → 10.
        assert_eq!(
            repriced.prices[1][20],
            Prices {
                delivered: 5,
                opened: 10
            }
        );
        assert_eq!(
            repriced.prices[1][3],
            Prices {
                delivered: 10,
                opened: 20
            }
        );
        assert_eq!(repriced.rates[1][9], Some(300));
        assert_eq!(repriced.rates[1][3], None);
        // Other channels had nothing: base.
        assert_eq!(
            repriced.prices[0][9],
            Prices {
                delivered: 10,
                opened: 20
            }
        );

        let fixed = RateCard::new(&flat(10, 20), None).unwrap();
        assert_eq!(reprice(&fixed, &counts).prices, fixed.base);
    }

    #[test]
    fn slots_are_local_hours() {
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        // 2026-11-26T09:30:00Z is 18:30 in Tokyo.
        let at = 1_795_685_400_000;
        assert_eq!(slot_of(at, &tokyo), 18);
        assert_eq!(hour_start(at, &tokyo), at - 30 * 60_000);
        assert_eq!(slots_between(at, at, &tokyo), vec![18]);
        assert_eq!(
            slots_between(at, at + 2 * 3_600_000, &tokyo),
            vec![18, 19, 20]
        );
        let kolkata = TimeZone::get("Asia/Kolkata").unwrap();
        // 15:00 in Kolkata: the local hour started on the hour there.
        assert_eq!(slot_of(at, &kolkata), 15);
        assert_eq!(hour_start(at, &kolkata), at);
    }

    #[test]
    fn quotes_bound_the_charge() {
        let mut entries = flat(3, 5);
        entries[1] = RateEntry {
            channel: Channel::Sms,
            from_hour: 0,
            to_hour: 12,
            prices: Prices {
                delivered: 2,
                opened: 4,
            },
        };
        entries.push(RateEntry {
            channel: Channel::Sms,
            from_hour: 12,
            to_hour: 0,
            prices: Prices {
                delivered: 6,
                opened: 8,
            },
        });
        let card = RateCard::new(&entries, None).unwrap();
        let one = Quote::new(10, Some((7, &card.base)), &[Channel::Sms], &[13], false);
        assert_eq!((one.delivered_low, one.delivered_high), (60, 60));
        assert_eq!((one.opened_low, one.opened_high), (80, 80));
        let spread = Quote::new(10, Some((7, &card.base)), &[Channel::Sms], &[11, 12], false);
        assert_eq!((spread.delivered_low, spread.delivered_high), (20, 60));
        let prepaid = Quote::new(10, Some((7, &card.base)), &[Channel::Sms], &[13], true);
        assert_eq!((prepaid.delivered_high, prepaid.opened_high), (0, 80));
        let free = Quote::new(10, None, &[], &[13], false);
        assert_eq!((free.delivered_high, free.lines.len()), (0, 0));
    }

    #[test]
    fn months_are_local() {
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        let (start, end) = month_bounds("month", "2026-11", &tokyo).unwrap();
        // 2026-11-01T00:00+09:00 and 2026-12-01T00:00+09:00.
        assert_eq!(start, 1_793_458_800_000);
        assert_eq!(end, 1_796_050_800_000);
        for bad in ["2026-13", "26-11", "2026/11", "november"] {
            assert!(month_bounds("month", bad, &tokyo).is_err(), "{bad}");
        }
    }
}
