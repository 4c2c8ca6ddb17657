//! Price tables and the billing ledger. A rate card becomes a price table
//! version (every channel × local hour); dynamic pricing publishes a new
//! version when the slots' open rates move the prices. Charges are written
//! to the append-only `ledger` by the rollup fold ([`ChargeSteps::charge_events`]) from
//! deduplicated delivered and opened events — so a fan-out over several
//! carriers or channels, or a receipt arriving twice, is charged once, and
//! nothing undelivered is charged. Statements and revenue only sum the
//! ledger. What prices are is `crate::pricing`'s business.

use std::collections::HashMap;

use jiff::tz::TimeZone;
use sqlx::{AssertSqlSafe, QueryBuilder};

use super::{Store, WritePool, on_pool, on_write, transaction_steps};
use crate::error::{Error, Result};
use crate::pricing::{
    self, Dynamic, Grid, PRICED_CHANNELS, Prices, RateCard, SLOTS, SlotCounts, Yen, channel_index,
};
use crate::targeting::Channel;

/// How far back dynamic prices look at open rates.
const PRICING_LOOKBACK_MS: i64 = 30 * 24 * 3_600_000;

/// One published price table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    pub id: i64,
    pub zone: String,
    pub created_at: i64,
    pub card: RateCard,
    pub prices: Grid,
    /// The open rate (per mille) behind each dynamic price.
    pub rates: [[Option<i64>; SLOTS]; 4],
    pub checked_at: i64,
}

/// A statement or revenue line: what was charged, summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerSum {
    /// The grouping values, in the requested order.
    pub key: Vec<String>,
    pub quantity: i64,
    pub amount: Yen,
}

/// What ledger sums may be grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerDimension {
    Kind,
    Channel,
    Slot,
    UnitPrice,
    Carrier,
    Enterprise,
    Message,
}

impl LedgerDimension {
    /// The ledger column grouped on.
    fn column(self) -> &'static str {
        match self {
            Self::Kind => "kind",
            Self::Channel => "channel",
            Self::Slot => "slot",
            Self::UnitPrice => "unit_price",
            Self::Carrier => "carrier_id",
            Self::Enterprise => "enterprise_id",
            Self::Message => "CASE WHEN message_id = '' THEN bid_id ELSE message_id END",
        }
    }

    /// Whether the column is a number (selected as text, ordered as a number).
    fn numeric(self) -> bool {
        matches!(self, Self::Channel | Self::Slot | Self::UnitPrice)
    }
}

transaction_steps! {
    /// Billing inside the rollup fold's transaction.
    pub(crate) trait ChargeSteps {
        /// Writes ledger lines for the delivered and opened events among the fold's
        /// rows (`fold_rows`, see `stats.rs`), at `now`.
        /// Each event is priced on the table its message was accepted under, in the
        /// slot of its delivery; deliveries of messages sent with a winning bid were
        /// paid for by the award. Lines are grouped by message, kind, channel, slot,
        /// carrier and local hour of the events.
        async fn charge_events(&mut self, now: i64) -> Result<()> {
            // Grouped by quarter hour: every zone's offset is a whole number of
            // quarter hours, so all instants of one quarter hour fall in one
            // local hour and one price slot — what `ledger_lines` groups by.
            let events = "SELECT f.enterprise_id, f.message_id, f.kind, f.channel, f.carrier_id,
                        f.at / 900000 * 900000 AS at, COALESCE(d.at, f.at) / 900000 * 900000 AS delivered_at,
                        m.price_table, m.bid_id IS NOT NULL AS prepaid, COUNT(*) AS count
                 FROM fold_rows f JOIN messages m ON m.id = f.message_id
                 LEFT JOIN events d ON d.message_id = f.message_id AND d.user_id = f.user_id AND d.kind = 2
                 WHERE f.kind IN (2, 3) AND m.price_table IS NOT NULL
                 GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9";
            let charged: Vec<ChargedEvent> =
                sqlx::query_as(events).fetch_all(&mut *self).await?;
            if !charged.is_empty() {
                let mut ids: Vec<i64> = charged.iter().map(|c| c.price_table).collect();
                ids.sort_unstable();
                ids.dedup();
                let mut tables = HashMap::new();
                for id in ids {
                    let zone: String = sqlx::query_scalar("SELECT zone FROM price_tables WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *self)
                        .await?;
                    let cells: Vec<Cell> = sqlx::query_as(
                        "SELECT channel, hour, base_delivered, base_opened, delivered, opened, rate_permille
                         FROM price_cells WHERE table_id = $1",
                    )
                    .bind(id)
                    .fetch_all(&mut *self)
                    .await?;
                    let zone = jiff::tz::TimeZone::get(&zone).unwrap_or(jiff::tz::TimeZone::UTC);
                    tables.insert(id, (zone, grids(&cells).1));
                }
                let lines = ledger_lines(&charged, &tables);
                for chunk in lines.chunks(super::ROWS_PER_STATEMENT) {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO ledger (enterprise_id, kind, message_id, bid_id, channel, slot, carrier_id,
                                             quantity, unit_price, amount, at, recorded_at) ",
                    );
                    insert.push_values(chunk, |mut row, line| {
                        row.push_bind(&line.enterprise_id)
                            .push_bind(line.kind)
                            .push_bind(&line.message_id)
                            .push_bind("")
                            .push_bind(line.channel)
                            .push_bind(line.slot)
                            .push_bind(&line.carrier_id)
                            .push_bind(line.quantity)
                            .push_bind(line.unit_price)
                            .push_bind(line.quantity * line.unit_price)
                            .push_bind(line.at)
                            .push_bind(now);
                    });
                    insert.build().persistent(false).execute(&mut *self).await?;
                }
            }
            Ok(())
        }
    }
}

/// Delivered or opened events of one group the fold charges: the
/// enterprise and message, event kind, channel, carrier, when and when
/// delivered (each to its quarter hour), the price table, whether the
/// message was sent with a bid (prepaid), and how many.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct ChargedEvent {
    pub enterprise_id: String,
    pub message_id: String,
    pub kind: i64,
    pub channel: i64,
    pub carrier_id: String,
    pub at: i64,
    pub delivered_at: i64,
    pub price_table: i64,
    pub prepaid: bool,
    pub count: i64,
}

/// A stored price cell: channel, hour, base delivered/opened, delivered/opened, rate.
pub(crate) type Cell = (i64, i64, i64, i64, i64, i64, i64);

/// The base and current grids (and rates) of a table's cells.
pub(crate) fn grids(cells: &[Cell]) -> (Grid, Grid, [[Option<i64>; SLOTS]; 4]) {
    let mut base = [[Prices::default(); SLOTS]; 4];
    let mut current = base;
    let mut rates = [[None; SLOTS]; 4];
    for &(channel, hour, base_delivered, base_opened, delivered, opened, rate) in cells {
        let row = channel_index(Channel::from_number(channel));
        let hour = hour.rem_euclid(SLOTS as i64) as usize;
        base[row][hour] = Prices {
            delivered: base_delivered,
            opened: base_opened,
        };
        current[row][hour] = Prices { delivered, opened };
        rates[row][hour] = (rate >= 0).then_some(rate);
    }
    (base, current, rates)
}

/// One line to append to the ledger.
pub(crate) struct LedgerLine {
    pub enterprise_id: String,
    pub kind: &'static str,
    pub message_id: String,
    pub channel: i64,
    pub slot: i64,
    pub carrier_id: String,
    pub quantity: i64,
    pub unit_price: Yen,
    pub at: i64,
}

/// Prices `events` on their `tables` and groups them into ledger lines;
/// free events (a zero price, or a delivery prepaid by an award) make none.
pub(crate) fn ledger_lines(
    events: &[ChargedEvent],
    tables: &HashMap<i64, (TimeZone, Grid)>,
) -> Vec<LedgerLine> {
    type Key<'a> = (&'a str, &'a str, i64, i64, usize, &'a str, i64, Yen);
    let mut grouped: HashMap<Key<'_>, i64> = HashMap::new();
    for event in events {
        let Some((zone, grid)) = tables.get(&event.price_table) else {
            continue;
        };
        let slot = pricing::slot_of(event.delivered_at, zone);
        let prices = grid[channel_index(Channel::from_number(event.channel))][slot];
        let unit = match event.kind {
            2 if event.prepaid => 0,
            2 => prices.delivered,
            _ => prices.opened,
        };
        if unit == 0 {
            continue;
        }
        let hour = pricing::hour_start(event.at, zone);
        let key = (
            event.enterprise_id.as_str(),
            event.message_id.as_str(),
            event.kind,
            event.channel,
            slot,
            event.carrier_id.as_str(),
            hour,
            unit,
        );
        *grouped.entry(key).or_default() += event.count;
    }
    let mut lines: Vec<LedgerLine> = grouped
        .into_iter()
        .map(
            |((enterprise, message, kind, channel, slot, carrier, at, unit), quantity)| {
                LedgerLine {
                    enterprise_id: enterprise.to_owned(),
                    kind: if kind == 2 { "delivered" } else { "opened" },
                    message_id: message.to_owned(),
                    channel,
                    slot: slot as i64,
                    carrier_id: carrier.to_owned(),
                    quantity,
                    unit_price: unit,
                    at,
                }
            },
        )
        .collect();
    lines.sort_by(|a, b| (a.at, &a.message_id, a.kind).cmp(&(b.at, &b.message_id, b.kind)));
    lines
}

impl Store {
    /// Publishes `card` as a new price table in `zone` at `now`, with
    /// dynamic prices from the last 30 days' open rates when it asks for them.
    pub async fn set_rate_card(&self, card: &RateCard, zone: &str, now: i64) -> Result<PriceTable> {
        let tz = TimeZone::get(zone)
            .map_err(|_| Error::invalid("zone", format!("{zone:?} is not an IANA time zone")))?;
        let counts = self.slot_counts(now, &tz).await?;
        let repriced = pricing::reprice(card, &counts);
        self.publish(card, zone, &repriced, now).await
    }

    /// Recomputes dynamic prices when the current table was last checked
    /// `interval_ms` or more ago, publishing a new version only when a price
    /// moved. Returns the new table's id.
    pub async fn reprice_if_due(&self, now: i64, interval_ms: i64) -> Result<Option<i64>> {
        // Asked on every follow-through pass: a one-row look before the table.
        let due: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM price_tables WHERE id = (SELECT MAX(id) FROM price_tables)
               AND floor_percent IS NOT NULL AND checked_at <= $1",
        )
        .bind(now - interval_ms)
        .fetch_optional(pool)
        .await)?;
        let Some(id) = due else {
            return Ok(None);
        };
        let Some(table) = self.price_table(Some(id)).await? else {
            return Ok(None);
        };
        let tz = TimeZone::get(&table.zone).unwrap_or(TimeZone::UTC);
        let counts = self.slot_counts(now, &tz).await?;
        let repriced = pricing::reprice(&table.card, &counts);
        if repriced.prices == table.prices {
            on_write!(self, pool => sqlx::query("UPDATE price_tables SET checked_at = $2 WHERE id = $1")
                .bind(table.id)
                .bind(now)
                .execute(pool)
                .await
                .map(|_| ()))?;
            return Ok(None);
        }
        let published = self
            .publish(&table.card, &table.zone, &repriced, now)
            .await?;
        Ok(Some(published.id))
    }

    async fn publish(
        &self,
        card: &RateCard,
        zone: &str,
        repriced: &pricing::Repriced,
        now: i64,
    ) -> Result<PriceTable> {
        let dynamic = card.dynamic;
        let id: i64 = on_write!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO price_tables (zone, created_at, floor_percent, ceiling_percent, min_deliveries, checked_at)
                 VALUES ($1, $2, $3, $4, $5, $2) RETURNING id",
            )
            .bind(zone)
            .bind(now)
            .bind(dynamic.map(|d| d.floor_percent))
            .bind(dynamic.map(|d| d.ceiling_percent))
            .bind(dynamic.map_or(0, |d| d.min_deliveries))
            .fetch_one(&mut *tx)
            .await?;
            let mut cells = QueryBuilder::new(
                "INSERT INTO price_cells (table_id, channel, hour, base_delivered, base_opened, delivered, opened, rate_permille) ",
            );
            let all = PRICED_CHANNELS
                .iter()
                .flat_map(|&channel| (0..SLOTS).map(move |hour| (channel, hour)));
            cells.push_values(all, |mut row, (channel, hour)| {
                let index = channel_index(Some(channel));
                let base = card.base[index][hour];
                let price = repriced.prices[index][hour];
                row.push_bind(id)
                    .push_bind(Channel::number(Some(channel)))
                    .push_bind(hour as i64)
                    .push_bind(base.delivered)
                    .push_bind(base.opened)
                    .push_bind(price.delivered)
                    .push_bind(price.opened)
                    .push_bind(repriced.rates[index][hour].unwrap_or(-1));
            });
            cells.build().execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<i64, sqlx::Error>(id)
        })?;
        self.price_table(Some(id))
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("published price table vanished")))
    }

    /// Price table `id`, or the current one (`None`: no rate card yet).
    pub async fn price_table(&self, id: Option<i64>) -> Result<Option<PriceTable>> {
        type Head = (i64, String, i64, Option<i64>, Option<i64>, i64, i64);
        let (head, cells): (Option<Head>, Vec<Cell>) = on_pool!(self, pool => {
            let head: Option<Head> = sqlx::query_as(
                "SELECT id, zone, created_at, floor_percent, ceiling_percent, min_deliveries, checked_at
                 FROM price_tables WHERE id = COALESCE($1, (SELECT MAX(id) FROM price_tables))",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let cells = match &head {
                Some((id, ..)) => sqlx::query_as(
                    "SELECT channel, hour, base_delivered, base_opened, delivered, opened, rate_permille
                     FROM price_cells WHERE table_id = $1",
                )
                .bind(id)
                .fetch_all(pool)
                .await?,
                None => Vec::new(),
            };
            Ok::<_, sqlx::Error>((head, cells))
        })?;
        Ok(head.map(
            |(id, zone, created_at, floor, ceiling, min_deliveries, checked_at)| {
                let (base, prices, rates) = grids(&cells);
                PriceTable {
                    id,
                    zone,
                    created_at,
                    card: RateCard {
                        base,
                        dynamic: floor.zip(ceiling).map(|(floor_percent, ceiling_percent)| {
                            Dynamic {
                                floor_percent,
                                ceiling_percent,
                                min_deliveries,
                            }
                        }),
                    },
                    prices,
                    rates,
                    checked_at,
                }
            },
        ))
    }

    /// Hub-wide deliveries and opens per channel × local hour of the send
    /// over the last 30 days (from the rollups).
    async fn slot_counts(&self, now: i64, zone: &TimeZone) -> Result<[[SlotCounts; SLOTS]; 4]> {
        let rows: Vec<(i64, i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT channel, send_hour, CAST(SUM(delivered) AS BIGINT), CAST(SUM(opened) AS BIGINT)
             FROM stats_cells WHERE channel > 0 AND send_hour >= $1 GROUP BY channel, send_hour",
        )
        .bind((now - PRICING_LOOKBACK_MS).div_euclid(3_600_000))
        .fetch_all(pool)
        .await)?;
        let mut counts = [[SlotCounts::default(); SLOTS]; 4];
        for (channel, hour, delivered, opened) in rows {
            let slot = pricing::slot_of(hour * 3_600_000, zone);
            let cell = &mut counts[channel_index(Channel::from_number(channel))][slot];
            cell.delivered += delivered;
            cell.opened += opened;
        }
        Ok(counts)
    }

    /// Ledger sums in `[start, end)` grouped by `by`, for one enterprise or
    /// the whole hub, ordered by the grouping values.
    pub async fn ledger_sums(
        &self,
        enterprise_id: Option<&str>,
        start: i64,
        end: i64,
        by: &[LedgerDimension],
    ) -> Result<Vec<LedgerSum>> {
        let grouped: Vec<&str> = by.iter().map(|d| d.column()).collect();
        let selected: Vec<String> = by
            .iter()
            .map(|d| match d.numeric() {
                true => format!("CAST({} AS TEXT)", d.column()),
                false => d.column().to_owned(),
            })
            .collect();
        let mut select = selected.join(", ");
        if !select.is_empty() {
            select.push_str(", ");
        }
        let mut sql = format!(
            "SELECT {select}CAST(SUM(quantity) AS BIGINT), CAST(SUM(amount) AS BIGINT) FROM ledger
             WHERE at >= $1 AND at < $2 AND ($3 = '' OR enterprise_id = $3)"
        );
        if !by.is_empty() {
            let grouped = grouped.join(", ");
            sql.push_str(&format!(" GROUP BY {grouped} ORDER BY {grouped}"));
        }
        let rows: Vec<LedgerSum> = on_pool!(self, pool => {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(start)
                .bind(end)
                .bind(enterprise_id.unwrap_or(""))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    use sqlx::Row;
                    let mut key = Vec::with_capacity(by.len());
                    for index in 0..by.len() {
                        key.push(row.try_get::<String, _>(index)?);
                    }
                    Ok(LedgerSum {
                        key,
                        quantity: row.try_get::<Option<i64>, _>(by.len())?.unwrap_or(0),
                        amount: row.try_get::<Option<i64>, _>(by.len() + 1)?.unwrap_or(0),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        })?;
        Ok(rows
            .into_iter()
            .filter(|row| !by.is_empty() || row.quantity != 0 || row.amount != 0)
            .collect())
    }

    /// What one message has been charged so far (yen).
    pub async fn message_charges(&self, message_id: &str) -> Result<Yen> {
        let charged: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT CAST(SUM(amount) AS BIGINT) FROM ledger WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_one(pool)
        .await)?;
        Ok(charged.unwrap_or(0))
    }
}
