//! An enterprise's messages: the list, one message's funnel (by channel,
//! with rates and their 95% intervals) and one ref's decision trace, and
//! open rates by hour and channel.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;
use serde::Deserialize;

use super::charts::{self, Bar};
use super::enterprise::{channel_name, checked, enterprise, percent, time};
use super::{Console, Nav, Who, refused, render};
use crate::stats::{Estimate, wilson};
use crate::storage::ChannelFunnel;

const PAGE_ROWS: i64 = 50;

struct MessageLine {
    id: String,
    accepted: String,
    target: String,
    state: &'static str,
    matched: String,
    text: String,
}

#[derive(Template)]
#[template(path = "console/messages.html")]
struct MessagesPage {
    nav: Nav,
    rows: Vec<MessageLine>,
    next: Option<i64>,
}

#[derive(Deserialize)]
pub(super) struct Paging {
    before: Option<i64>,
}

pub(super) async fn messages(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(paging): Query<Paging>,
) -> Response {
    let who = match enterprise(&console, &headers).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    let Who::Enterprise { enterprise_id, .. } = &who else {
        return Redirect::to("/console").into_response();
    };
    let rows = match console
        .relay
        .store
        .recent_messages(enterprise_id, paging.before.unwrap_or(i64::MAX), PAGE_ROWS)
        .await
    {
        Ok(rows) => rows,
        Err(error) => return refused(&who, &tonic::Status::from(error)),
    };
    let next = (rows.len() as i64 == PAGE_ROWS)
        .then(|| rows.last().map(|r| r.accepted_at))
        .flatten();
    let rows = rows
        .into_iter()
        .map(|row| MessageLine {
            accepted: chukei_proto::web::local_time(row.accepted_at, "UTC"),
            target: row.target_kind,
            state: match row.state {
                1 => "accepted",
                2 => "expanded",
                _ => "handed over",
            },
            matched: row
                .matched
                .map_or_else(|| "…".to_owned(), |m| m.to_string()),
            text: row.text,
            id: row.id,
        })
        .collect();
    render(MessagesPage {
        nav: Nav::of(Some(&who)),
        rows,
        next,
    })
}

struct Step {
    label: &'static str,
    count: u64,
    rate: String,
}

struct ChannelLine {
    channel: &'static str,
    handed_over: u64,
    delivered: u64,
    opened: u64,
    failed: u64,
    expired: u64,
    unsupported: u64,
    open_rate: String,
}

struct Trace {
    user_ref: String,
    attempts: Vec<(u32, &'static str, String, String, String)>,
    events: Vec<(String, String, &'static str)>,
}

#[derive(Template)]
#[template(path = "console/message_detail.html")]
struct MessageDetail {
    nav: Nav,
    id: String,
    state: &'static str,
    plan: String,
    accepted: String,
    charged: i64,
    backlog: u64,
    funnel: Vec<Step>,
    aside: Vec<(&'static str, u64)>,
    channels: Vec<ChannelLine>,
    chart: String,
    follow_up: String,
    trace: Option<Trace>,
    trace_error: Option<String>,
}

async fn message_detail(
    console: &Console,
    who: &Who,
    message_id: String,
    trace: Option<Trace>,
    trace_error: Option<String>,
) -> Response {
    let status = match console
        .api
        .get_message(who.request(pb::GetMessageRequest {
            message_id: message_id.clone(),
        }))
        .await
    {
        Ok(status) => status.into_inner(),
        Err(status) => return refused(who, &status),
    };
    let by_channel = match console.relay.store.funnel_by_channel(&message_id).await {
        Ok(rows) => rows,
        Err(error) => return refused(who, &tonic::Status::from(error)),
    };
    let (channels, bars) = channel_lines(by_channel);
    render(MessageDetail {
        nav: Nav::of(Some(who)),
        state: state_name(status.state),
        funnel: funnel(&status),
        aside: aside(&status),
        plan: status.plan,
        accepted: time(status.accepted_at.as_ref()),
        charged: status.charged,
        backlog: status.backlog,
        chart: charts::open_rates("Open rate by channel", &bars),
        channels,
        follow_up: status.follow_up_message_id,
        id: message_id,
        trace,
        trace_error,
    })
}

/// The message's state in words.
fn state_name(state: i32) -> &'static str {
    match pb::MessageState::try_from(state) {
        Ok(pb::MessageState::Accepted) => "accepted",
        Ok(pb::MessageState::Expanded) => "expanded",
        Ok(pb::MessageState::HandedOver) => "handed over",
        _ => "",
    }
}

/// Matched → handed over → delivered → opened, each step's rate of the one
/// before it.
fn funnel(status: &pb::MessageStatus) -> Vec<Step> {
    vec![
        Step {
            label: "Matched",
            count: status.matched,
            rate: String::new(),
        },
        Step {
            label: "Handed over",
            count: status.handed_over,
            rate: percent(wilson(status.handed_over, status.matched)),
        },
        Step {
            label: "Delivered",
            count: status.delivered,
            rate: percent(wilson(status.delivered, status.handed_over)),
        },
        Step {
            label: "Opened",
            count: status.opened,
            rate: percent(wilson(status.opened, status.delivered)),
        },
    ]
}

/// The counts beside the funnel.
fn aside(status: &pb::MessageStatus) -> Vec<(&'static str, u64)> {
    vec![
        ("Failed", status.failed),
        ("Expired", status.expired),
        ("Unsupported channel", status.unsupported),
        ("Deferred (quiet period)", status.deferred),
        ("Skipped (fatigue, budget)", status.skipped),
    ]
}

/// The funnel by channel as table lines, and their open rates as bars.
fn channel_lines(rows: Vec<ChannelFunnel>) -> (Vec<ChannelLine>, Vec<Bar>) {
    rows.into_iter()
        .map(|row| {
            let name = crate::policy::channel_name(row.channel);
            let estimate = wilson(row.opened, row.delivered);
            let bar = Bar {
                label: name.to_owned(),
                rate: estimate,
            };
            let line = ChannelLine {
                channel: name,
                handed_over: row.handed_over,
                delivered: row.delivered,
                opened: row.opened,
                failed: row.failed,
                expired: row.expired,
                unsupported: row.unsupported,
                open_rate: percent(estimate),
            };
            (line, bar)
        })
        .unzip()
}

pub(super) async fn message(
    State(console): State<Console>,
    headers: HeaderMap,
    Path(message_id): Path<String>,
) -> Response {
    let who = match enterprise(&console, &headers).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    message_detail(&console, &who, message_id, None, None).await
}

#[derive(Deserialize)]
pub(super) struct ExplainForm {
    user_ref: String,
    csrf: String,
}

pub(super) async fn explain(
    State(console): State<Console>,
    headers: HeaderMap,
    Path(message_id): Path<String>,
    Form(form): Form<ExplainForm>,
) -> Response {
    let who = match checked(&console, &headers, &form.csrf).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    let explained = console
        .api
        .explain_delivery(who.request(pb::ExplainDeliveryRequest {
            message_id: message_id.clone(),
            user_ref: form.user_ref.trim().to_owned(),
        }))
        .await;
    let (trace, error) = match explained {
        Ok(explanation) => {
            let explanation = explanation.into_inner();
            (
                Some(Trace {
                    user_ref: form.user_ref.trim().to_owned(),
                    attempts: explanation
                        .attempts
                        .iter()
                        .map(|a| {
                            (
                                a.attempt,
                                channel_name(a.channel),
                                a.state.clone(),
                                time(a.handed_over_at.as_ref()),
                                a.reason.clone(),
                            )
                        })
                        .collect(),
                    events: explanation
                        .events
                        .iter()
                        .map(|e| (e.kind.clone(), time(e.at.as_ref()), channel_name(e.channel)))
                        .collect(),
                }),
                None,
            )
        }
        Err(status)
            if status.code() == tonic::Code::NotFound
                && status.message().starts_with("message_id") =>
        {
            return refused(&who, &status);
        }
        Err(status) => (None, Some(status.message().to_owned())),
    };
    message_detail(&console, &who, message_id, trace, error).await
}

struct StatLine {
    key: String,
    sent: u64,
    delivered: u64,
    opened: u64,
    /// The API's own open rate and interval (none: nothing delivered, or withheld).
    estimate: Option<Estimate>,
    open_rate: String,
    note: &'static str,
}

#[derive(Template)]
#[template(path = "console/stats.html")]
struct StatsPage {
    nav: Nav,
    days: u32,
    zone: String,
    hour_chart: String,
    hours: Vec<StatLine>,
    channel_chart: String,
    channels: Vec<StatLine>,
}

#[derive(Deserialize)]
pub(super) struct StatsQuery {
    days: Option<u32>,
    zone: Option<String>,
}

pub(super) async fn stats(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(query): Query<StatsQuery>,
) -> Response {
    let who = match enterprise(&console, &headers).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    let days = query.days.unwrap_or(7).clamp(1, 90);
    let zone = query
        .zone
        .filter(|z| !z.is_empty())
        .unwrap_or_else(|| console.relay.market.zone_name.to_string());
    let mut tables = Vec::new();
    for by in [pb::StatsDimension::SendHour, pb::StatsDimension::Channel] {
        let response = console
            .api
            .get_stats(who.request(pb::GetStatsRequest {
                by: vec![by as i32],
                zone: zone.clone(),
                lookback: Some(prost_types::Duration {
                    seconds: i64::from(days) * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            }))
            .await;
        let rows = match response {
            Ok(response) => response.into_inner().rows,
            Err(status) => return refused(&who, &status),
        };
        let lines: Vec<StatLine> = rows.into_iter().map(stat_line).collect();
        tables.push(lines);
    }
    let channels = tables.pop().unwrap_or_default();
    let hours = tables.pop().unwrap_or_default();
    let (hour_bars, channel_bars) = stat_bars(&hours, &channels);
    render(StatsPage {
        nav: Nav::of(Some(&who)),
        days,
        hour_chart: charts::open_rates("Open rate by hour of sending", &hour_bars),
        channel_chart: charts::open_rates("Open rate by channel", &channel_bars),
        hours,
        channels,
        zone,
    })
}

/// One row of GetStats as a table line, with the API's marks in words.
fn stat_line(row: pb::StatsRow) -> StatLine {
    let estimate = row.open_rate.map(|e| Estimate {
        rate: e.rate,
        low: e.low,
        high: e.high,
    });
    StatLine {
        key: row.key.join(" "),
        sent: row.sent,
        delivered: row.delivered,
        opened: row.opened,
        estimate,
        open_rate: percent(estimate),
        note: if row.suppressed {
            "withheld (below the minimum cohort)"
        } else if row.low_sample {
            "few deliveries: read the interval"
        } else {
            ""
        },
    }
}

/// The charts' bars: the rates GetStats gave, every hour of the day in its
/// place (sent to or not), then each channel.
fn stat_bars(hours: &[StatLine], channels: &[StatLine]) -> (Vec<Bar>, Vec<Bar>) {
    let hour_bars = (0..24)
        .map(|hour: u32| Bar {
            label: hour.to_string(),
            rate: hours
                .iter()
                .find(|line| line.key.parse::<u32>().ok() == Some(hour))
                .and_then(|line| line.estimate),
        })
        .collect();
    let channel_bars = channels
        .iter()
        .map(|line| Bar {
            label: line.key.clone(),
            rate: line.estimate,
        })
        .collect();
    (hour_bars, channel_bars)
}
