//! Reading what the enterprise has: registrations (cursor pages),
//! statistics (JSON or CSV), the prices in force and a month's statement.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::wire;
use super::{Caller, Core, Problem};
use crate::content::Channel;

/// A page of registrations.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RegistrationsQuery {
    /// Only users of this service.
    service_id: Option<String>,
    /// At most this many (1–1000, default 100).
    page_size: Option<u32>,
    /// `next_page_token` of the page before.
    page_token: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Registration {
    pub user_ref: String,
    pub service_id: Option<String>,
    pub registered_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Registrations {
    pub registrations: Vec<Registration>,
    /// Absent on the last page.
    pub next_page_token: Option<String>,
}

/// The people registered with you, by ref, a page at a time.
#[utoipa::path(get, path = "/v1/registrations", tag = "reports", params(RegistrationsQuery),
    responses((status = 200, body = Registrations),
        (status = 400, description = "A bad page token or size", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn registrations(
    State(core): State<Core>,
    caller: Caller,
    Query(query): Query<RegistrationsQuery>,
) -> Result<Json<Registrations>, Problem> {
    let page = core
        .api
        .list_registrations(caller.request(pb::ListRegistrationsRequest {
            page_size: query.page_size.unwrap_or(100),
            page_token: query.page_token.unwrap_or_default(),
            service_id: query.service_id.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    Ok(Json(Registrations {
        registrations: page
            .registrations
            .into_iter()
            .map(|r| Registration {
                user_ref: r.user_ref,
                service_id: Some(r.service_id).filter(|s| !s.is_empty()),
                registered_at: wire::instant(r.registered_at.as_ref()),
            })
            .collect(),
        next_page_token: Some(page.next_page_token).filter(|t| !t.is_empty()),
    }))
}

/// What to group statistics by and over which sends.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// Comma-separated dimensions: channel, hour, open_hour, weekday, day,
    /// place, gender, age, region, occupation, user. None: one total row.
    by: Option<String>,
    /// Sends from this RFC 3339 instant (default: 7 days before `until`).
    since: Option<String>,
    /// Sends before this RFC 3339 instant (default: now).
    until: Option<String>,
    /// IANA zone for hours, weekdays and days (default UTC).
    zone: Option<String>,
    /// `csv` for text/csv (or send `Accept: text/csv`).
    format: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Estimate {
    pub rate: f64,
    /// The 95% Wilson interval.
    pub low: f64,
    pub high: f64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StatsRow {
    /// One value per column.
    pub key: Vec<String>,
    pub sent: u64,
    pub delivered: u64,
    pub opened: u64,
    pub open_rate: Option<Estimate>,
    /// Fewer deliveries than `min_sample`: the rate says little.
    pub low_sample: bool,
    /// Withheld: too few people to show.
    pub suppressed: bool,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Stats {
    pub columns: Vec<String>,
    pub rows: Vec<StatsRow>,
    pub min_cohort: u32,
    pub min_sample: u32,
}

/// Sent, delivered, opened and open rate (with its 95% interval) of your
/// messages, grouped as asked; cells about too few people withheld.
#[utoipa::path(get, path = "/v1/stats", tag = "reports", params(StatsQuery),
    responses((status = 200, description = "The rows, as JSON or (asked for) CSV",
            content((Stats = "application/json"), (String = "text/csv"))),
        (status = 400, description = "An unknown dimension, zone or instant", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn stats(
    State(core): State<Core>,
    caller: Caller,
    headers: HeaderMap,
    Query(query): Query<StatsQuery>,
) -> Result<Response, Problem> {
    let mut by = Vec::new();
    for name in query.by.as_deref().unwrap_or_default().split(',') {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let dimension = chukei_proto::stats::dimension(name).ok_or_else(|| {
            let known = chukei_proto::stats::dimension_names();
            Problem::invalid("by", &format!("unknown dimension {name:?}; one of {known}"))
        })?;
        by.push(dimension as i32);
    }
    let request = pb::GetStatsRequest {
        by,
        since: query
            .since
            .as_deref()
            .map(|at| wire::parse_instant("since", at))
            .transpose()?,
        until: query
            .until
            .as_deref()
            .map(|at| wire::parse_instant("until", at))
            .transpose()?,
        zone: query.zone.unwrap_or_default(),
        lookback: None,
    };
    let s = core
        .api
        .get_stats(caller.request(request))
        .await?
        .into_inner();
    let wants_csv = query.format.as_deref() == Some("csv")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv"));
    if wants_csv {
        let csv = chukei_proto::stats::csv(&s);
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    let stats = Stats {
        columns: s.columns,
        rows: s
            .rows
            .into_iter()
            .map(|r| StatsRow {
                key: r.key,
                sent: r.sent,
                delivered: r.delivered,
                opened: r.opened,
                open_rate: r.open_rate.map(|e| Estimate {
                    rate: e.rate,
                    low: e.low,
                    high: e.high,
                }),
                low_sample: r.low_sample,
                suppressed: r.suppressed,
            })
            .collect(),
        min_cohort: s.min_cohort,
        min_sample: s.min_sample,
    };
    Ok(Json(stats).into_response())
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PriceCell {
    pub channel: Option<Channel>,
    /// The local hour, 0–23.
    pub slot: u32,
    /// Yen per person delivered, and per person who opens.
    pub delivered_price: i64,
    pub opened_price: i64,
    pub base_delivered_price: i64,
    pub base_opened_price: i64,
    /// The slot's 30-day open rate, when dynamic pricing has one.
    pub open_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Prices {
    /// The table's version (0: no rate card yet).
    pub version: u64,
    pub zone: String,
    pub published_at: Option<String>,
    pub dynamic: bool,
    pub cells: Vec<PriceCell>,
}

/// The prices in force: yen per delivered and per opened message by channel
/// and local hour.
#[utoipa::path(get, path = "/v1/prices", tag = "reports", responses((status = 200, body = Prices)))]
pub(super) async fn prices(
    State(core): State<Core>,
    caller: Caller,
) -> Result<Json<Prices>, Problem> {
    let t = core
        .api
        .get_prices(caller.request(pb::GetPricesRequest {}))
        .await?
        .into_inner();
    Ok(Json(Prices {
        version: t.version,
        zone: t.zone,
        published_at: wire::instant(t.published_at.as_ref()),
        dynamic: t.dynamic,
        cells: t
            .cells
            .into_iter()
            .map(|c| PriceCell {
                channel: wire::channel(c.channel),
                slot: c.slot,
                delivered_price: c.delivered_price,
                opened_price: c.opened_price,
                base_delivered_price: c.base_delivered_price,
                base_opened_price: c.base_opened_price,
                open_rate: c.open_rate,
            })
            .collect(),
    }))
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StatementLine {
    /// delivered, opened or award.
    pub kind: String,
    pub channel: Option<Channel>,
    pub slot: Option<u32>,
    pub quantity: i64,
    /// Yen each, and in all.
    pub unit_price: i64,
    pub amount: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Statement {
    pub month: String,
    pub zone: String,
    pub lines: Vec<StatementLine>,
    /// Yen: the ledger's own sum.
    pub total: i64,
}

/// Your charges for one month (`2026-11`), from the billing ledger.
#[utoipa::path(get, path = "/v1/statements/{month}", tag = "reports",
    params(("month" = String, Path, description = "YYYY-MM")),
    responses((status = 200, body = Statement),
        (status = 400, description = "Not a month", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn statement(
    State(core): State<Core>,
    caller: Caller,
    Path(month): Path<String>,
) -> Result<Json<Statement>, Problem> {
    let s = core
        .api
        .get_statement(caller.request(pb::GetStatementRequest { month }))
        .await?
        .into_inner();
    Ok(Json(Statement {
        month: s.month,
        zone: s.zone,
        total: s.total,
        lines: s
            .lines
            .into_iter()
            .map(|l| StatementLine {
                kind: l.kind,
                channel: wire::channel(l.channel),
                slot: l.slot,
                quantity: l.quantity,
                unit_price: l.unit_price,
                amount: l.amount,
            })
            .collect(),
    }))
}
