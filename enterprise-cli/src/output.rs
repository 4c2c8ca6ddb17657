//! What the command line prints: each answer of the relay as a table for a
//! person or as JSON (`--json`), statistics also as CSV.

use std::io::Write;

use chukei_proto::clock;
use chukei_proto::common::v1 as common;
use chukei_proto::relay::v1 as pb;
use serde_json::json;

pub(crate) fn channel_name(channel: i32) -> &'static str {
    common::Channel::short_name_of(channel)
}

pub(crate) fn state_name(state: i32) -> &'static str {
    match pb::MessageState::try_from(state) {
        Ok(pb::MessageState::Accepted) => "accepted",
        Ok(pb::MessageState::Expanded) => "expanded",
        Ok(pb::MessageState::HandedOver) => "handed-over",
        _ => "unknown",
    }
}

pub(crate) fn print_quote(
    quote: &pb::Quote,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let lines: Vec<_> = quote
            .lines
            .iter()
            .map(|l| json!({"channel": channel_name(l.channel), "slot": l.slot, "delivered_price": l.delivered_price, "opened_price": l.opened_price}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({
                "recipients": quote.recipients,
                "price_table": quote.price_table,
                "zone": quote.zone,
                "lines": lines,
                "delivered": [quote.delivered_low, quote.delivered_high],
                "opened": [quote.opened_low, quote.opened_high],
                "prepaid": quote.prepaid,
            })
        )?;
        return Ok(());
    }
    if quote.price_table == 0 {
        writeln!(out, "recipients  {}", quote.recipients)?;
        writeln!(out, "no rate card is set: nothing is charged")?;
        return Ok(());
    }
    let range = |low: i64, high: i64| {
        if low == high {
            format!("¥{high}")
        } else {
            format!("¥{low}–¥{high}")
        }
    };
    writeln!(out, "recipients      {}", quote.recipients)?;
    writeln!(
        out,
        "price table     v{} ({})",
        quote.price_table, quote.zone
    )?;
    let prepaid = if quote.prepaid {
        " (prepaid by the winning bid)"
    } else {
        ""
    };
    writeln!(
        out,
        "if delivered    {}{prepaid}",
        range(quote.delivered_low, quote.delivered_high)
    )?;
    writeln!(
        out,
        "if all open     {} more",
        range(quote.opened_low, quote.opened_high)
    )?;
    writeln!(
        out,
        "{:<8}  {:>5}  {:>9}  {:>6}",
        "channel", "slot", "delivered", "opened"
    )?;
    for line in &quote.lines {
        writeln!(
            out,
            "{:<8}  {:>02}:00  {:>9}  {:>6}",
            channel_name(line.channel),
            line.slot,
            line.delivered_price,
            line.opened_price
        )?;
    }
    Ok(())
}

pub(crate) fn print_prices(
    table: &pb::PriceTable,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let cells: Vec<_> = table
            .cells
            .iter()
            .map(|c| json!({"channel": channel_name(c.channel), "slot": c.slot, "delivered_price": c.delivered_price, "opened_price": c.opened_price, "base_delivered_price": c.base_delivered_price, "base_opened_price": c.base_opened_price, "open_rate": c.open_rate}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"version": table.version, "zone": table.zone, "dynamic": table.dynamic, "cells": cells})
        )?;
        return Ok(());
    }
    if table.version == 0 {
        writeln!(out, "no rate card is set: nothing is charged")?;
        return Ok(());
    }
    let kind = if table.dynamic { "dynamic" } else { "fixed" };
    writeln!(
        out,
        "price table v{} ({kind}), hours in {}; yen delivered/opened",
        table.version, table.zone
    )?;
    write!(out, "{:<6}", "hour")?;
    let channels = ["rcs", "sms", "sns", "email"];
    for channel in channels {
        write!(out, "  {channel:>11}")?;
    }
    writeln!(out)?;
    for slot in 0..24 {
        write!(out, "{slot:02}:00 ")?;
        for channel in channels {
            let cell = table
                .cells
                .iter()
                .find(|c| c.slot == slot && channel_name(c.channel) == channel);
            let text = cell.map_or_else(
                || "-".to_owned(),
                |c| format!("{}/{}", c.delivered_price, c.opened_price),
            );
            write!(out, "  {text:>11}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

pub(crate) fn print_statement(
    statement: &pb::Statement,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let lines: Vec<_> = statement
            .lines
            .iter()
            .map(|l| json!({"kind": l.kind, "channel": channel_name(l.channel), "slot": l.slot, "quantity": l.quantity, "unit_price": l.unit_price, "amount": l.amount}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"month": statement.month, "zone": statement.zone, "lines": lines, "total": statement.total})
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "statement {} ({}), yen",
        statement.month, statement.zone
    )?;
    writeln!(
        out,
        "{:<10}  {:<7}  {:>5}  {:>9}  {:>6}  {:>10}",
        "kind", "channel", "slot", "quantity", "price", "amount"
    )?;
    for line in &statement.lines {
        let slot = line
            .slot
            .map_or_else(|| "-".to_owned(), |s| format!("{s:02}:00"));
        writeln!(
            out,
            "{:<10}  {:<7}  {:>5}  {:>9}  {:>6}  {:>10}",
            line.kind,
            channel_name(line.channel),
            slot,
            line.quantity,
            line.unit_price,
            line.amount
        )?;
    }
    writeln!(out, "{:<51}  {:>10}", "total", statement.total)?;
    Ok(())
}

pub(crate) fn rule_name(rule: i32) -> &'static str {
    match pb::PricingRule::try_from(rule) {
        Ok(pb::PricingRule::PayAsBid) => "pay-as-bid",
        Ok(pb::PricingRule::Uniform) => "uniform",
        _ => "-",
    }
}

pub(crate) fn print_slots(
    slots: &[pb::AuctionSlot],
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let rows: Vec<_> = slots
            .iter()
            .map(|s| json!({"slot_id": s.slot_id, "channel": channel_name(s.channel), "starts_at": rfc3339(s.starts_at.as_ref()), "ends_at": rfc3339(s.ends_at.as_ref()), "capacity": s.capacity, "closes_at": rfc3339(s.closes_at.as_ref()), "reserve_price": s.reserve_price, "rule": rule_name(s.rule), "closed": s.closed, "awarded": s.awarded, "clearing_price": s.clearing_price}))
            .collect();
        writeln!(out, "{}", json!({"slots": rows}))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40}  {:<7}  {:<20}  {:<20}  {:>8}  {:<20}  {:>7}  {:<10}  result",
        "slot_id", "channel", "starts_at", "ends_at", "capacity", "closes_at", "reserve", "rule"
    )?;
    for slot in slots {
        let result = match (slot.closed, slot.clearing_price) {
            (false, _) => "open for bids".to_owned(),
            (true, Some(price)) => format!("{} awarded at ¥{price}", slot.awarded),
            (true, None) => "closed, nothing awarded".to_owned(),
        };
        writeln!(
            out,
            "{:<40}  {:<7}  {:<20}  {:<20}  {:>8}  {:<20}  {:>7}  {:<10}  {result}",
            slot.slot_id,
            channel_name(slot.channel),
            rfc3339(slot.starts_at.as_ref()),
            rfc3339(slot.ends_at.as_ref()),
            slot.capacity,
            rfc3339(slot.closes_at.as_ref()),
            slot.reserve_price,
            rule_name(slot.rule),
        )?;
    }
    Ok(())
}

pub(crate) fn print_bid(
    bid: &pb::Bid,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let state = match pb::BidState::try_from(bid.state) {
        Ok(pb::BidState::Sealed) => "sealed",
        Ok(pb::BidState::Won) => "won",
        Ok(pb::BidState::Lost) => "lost",
        _ => "-",
    };
    if json {
        writeln!(
            out,
            "{}",
            json!({"bid_id": bid.bid_id, "slot_id": bid.slot_id, "quantity": bid.quantity, "price": bid.price, "state": state, "awarded": bid.awarded, "pays": bid.pays, "used": bid.used, "channel": channel_name(bid.channel), "starts_at": rfc3339(bid.starts_at.as_ref()), "ends_at": rfc3339(bid.ends_at.as_ref())})
        )?;
        return Ok(());
    }
    writeln!(out, "bid_id      {}", bid.bid_id)?;
    writeln!(out, "slot_id     {}", bid.slot_id)?;
    writeln!(
        out,
        "bid         {} messages at ¥{}",
        bid.quantity, bid.price
    )?;
    writeln!(out, "state       {state}")?;
    if state == "won" {
        writeln!(
            out,
            "awarded     {} messages at ¥{} each",
            bid.awarded, bid.pays
        )?;
        writeln!(out, "left        {}", bid.awarded.saturating_sub(bid.used))?;
        writeln!(
            out,
            "send        {} from {} to {} with --bid {}",
            channel_name(bid.channel),
            rfc3339(bid.starts_at.as_ref()),
            rfc3339(bid.ends_at.as_ref()),
            bid.bid_id
        )?;
    }
    Ok(())
}

pub(crate) fn print_stats(
    stats: &pb::GetStatsResponse,
    json: bool,
    csv: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let rate = |row: &pb::StatsRow| row.open_rate.unwrap_or_default();
    if json {
        let rows: Vec<_> = stats
            .rows
            .iter()
            .map(|row| {
                let key: serde_json::Map<String, serde_json::Value> = stats
                    .columns
                    .iter()
                    .cloned()
                    .zip(row.key.iter().map(|k| json!(k)))
                    .collect();
                json!({
                    "key": key,
                    "sent": row.sent,
                    "delivered": row.delivered,
                    "opened": row.opened,
                    "open_rate": row.open_rate.map(|r| json!({"rate": r.rate, "low": r.low, "high": r.high})),
                    "low_sample": row.low_sample,
                    "suppressed": row.suppressed,
                })
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"rows": rows, "min_cohort": stats.min_cohort, "min_sample": stats.min_sample})
        )?;
        return Ok(());
    }
    if csv {
        write!(out, "{}", chukei_proto::stats::csv(stats))?;
        return Ok(());
    }
    let widths: Vec<usize> = stats
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            stats
                .rows
                .iter()
                .map(|r| r.key.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let mut line = String::new();
    for (column, width) in stats.columns.iter().zip(&widths) {
        line.push_str(&format!("{column:<width$}  "));
    }
    writeln!(
        out,
        "{line}{:>9} {:>10} {:>8} {:>9}  95% interval",
        "sent", "delivered", "opened", "open_rate"
    )?;
    for row in &stats.rows {
        let mut line = String::new();
        for (value, width) in row.key.iter().zip(&widths) {
            line.push_str(&format!("{value:<width$}  "));
        }
        if row.suppressed {
            writeln!(
                out,
                "{line}{:>9} {:>10} {:>8} {:>9}  (fewer than {} people-messages: withheld)",
                "-", "-", "-", "-", stats.min_cohort
            )?;
            continue;
        }
        let (shown, interval) = match row.open_rate {
            Some(_) => {
                let r = rate(row);
                (
                    format!("{:.1}%", 100.0 * r.rate),
                    format!(
                        "{:.1}–{:.1}%{}",
                        100.0 * r.low,
                        100.0 * r.high,
                        if row.low_sample {
                            "  (small sample)"
                        } else {
                            ""
                        }
                    ),
                )
            }
            None => ("-".to_owned(), "(nothing delivered)".to_owned()),
        };
        writeln!(
            out,
            "{line}{:>9} {:>10} {:>8} {:>9}  {interval}",
            row.sent, row.delivered, row.opened, shown
        )?;
    }
    Ok(())
}

pub(crate) fn print_status(
    status: &pb::MessageStatus,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "message_id": status.message_id,
                "state": state_name(status.state),
                "matched": status.matched,
                "handed_over": status.handed_over,
                "delivered": status.delivered,
                "opened": status.opened,
                "failed": status.failed,
                "expired": status.expired,
                "unsupported": status.unsupported,
                "deferred": status.deferred,
                "skipped": status.skipped,
                "plan": status.plan,
                "follow_up_message_id": status.follow_up_message_id,
                "charged": status.charged,
                "backlog": status.backlog,
                "expected_drain_secs": status.expected_drain.as_ref().map(|d| d.seconds),
            })
        )?;
    } else {
        writeln!(out, "plan: {}", status.plan)?;
        if !status.follow_up_message_id.is_empty() {
            writeln!(out, "follow-up message: {}", status.follow_up_message_id)?;
        }
        let rate = if status.delivered > 0 {
            format!(
                "{:.1}%",
                100.0 * status.opened as f64 / status.delivered as f64
            )
        } else {
            "-".to_owned()
        };
        writeln!(
            out,
            "{:<12} {:>9} {:>12} {:>10} {:>8} {:>7} {:>10}",
            "state", "matched", "handed_over", "delivered", "opened", "failed", "open_rate"
        )?;
        writeln!(
            out,
            "{:<12} {:>9} {:>12} {:>10} {:>8} {:>7} {:>10}",
            state_name(status.state),
            status.matched,
            status.handed_over,
            status.delivered,
            status.opened,
            status.failed,
            rate
        )?;
        if status.expired + status.unsupported + status.deferred + status.skipped > 0 {
            writeln!(
                out,
                "expired {}  unsupported {}  deferred {}  skipped {}",
                status.expired, status.unsupported, status.deferred, status.skipped
            )?;
        }
        if status.backlog > 0 {
            let drain = status
                .expected_drain
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |d| format!("~{}s", d.seconds));
            writeln!(out, "backlog {} (drains in {drain})", status.backlog)?;
        }
        writeln!(out, "charged so far: ¥{}", status.charged)?;
    }
    Ok(())
}

pub(crate) fn rfc3339(at: Option<&prost_types::Timestamp>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |t| clock::rfc3339(clock::from_timestamp(t)),
    )
}

pub(crate) fn print_explanation(
    explanation: &pb::DeliveryExplanation,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if json {
        let attempts: Vec<_> = explanation
            .attempts
            .iter()
            .map(|a| {
                json!({
                    "attempt": a.attempt,
                    "channel": channel_name(a.channel),
                    "state": a.state,
                    "not_before": rfc3339(a.not_before.as_ref()),
                    "handed_over_at": a.handed_over_at.as_ref().map(|t| rfc3339(Some(t))),
                    "reason": a.reason,
                })
            })
            .collect();
        let events: Vec<_> = explanation
            .events
            .iter()
            .map(|e| json!({"kind": e.kind, "at": rfc3339(e.at.as_ref()), "channel": channel_name(e.channel)}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"message_id": explanation.message_id, "plan": explanation.plan, "attempts": attempts, "events": events})
        )?;
        return Ok(());
    }
    writeln!(out, "plan: {}", explanation.plan)?;
    writeln!(out, "attempts:")?;
    for a in &explanation.attempts {
        writeln!(
            out,
            "  #{} {:<7} {:<12} not before {}  handed over {}",
            a.attempt,
            channel_name(a.channel),
            a.state,
            rfc3339(a.not_before.as_ref()),
            rfc3339(a.handed_over_at.as_ref()),
        )?;
        writeln!(out, "     {}", a.reason)?;
    }
    writeln!(out, "events:")?;
    for e in &explanation.events {
        writeln!(
            out,
            "  {:<12} {}  {}",
            e.kind,
            rfc3339(e.at.as_ref()),
            channel_name(e.channel)
        )?;
    }
    Ok(())
}
