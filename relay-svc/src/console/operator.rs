//! The operator's page: each carrier's counts and connection, the
//! reconciliation findings (receipts against the carriers' own reports),
//! and the month's revenue by carrier and channel.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::admin_server::Admin;
use serde::Deserialize;

use super::{Console, Nav, Who, refused, render};

#[derive(Template)]
#[template(path = "console/operator.html")]
struct OperatorPage {
    nav: Nav,
    month: String,
    carriers: Vec<pb::CarrierStats>,
    findings: Vec<(String, String, u64, u64, u64, u64, String)>,
    revenue_columns: Vec<String>,
    revenue: Vec<(Vec<String>, i64, i64)>,
    revenue_total: i64,
}

#[derive(Deserialize)]
pub(super) struct MonthQuery {
    month: Option<String>,
}

pub(super) async fn overview(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(query): Query<MonthQuery>,
) -> Response {
    let who = match console.who(&headers).await {
        Some(who @ Who::Operator { .. }) => who,
        Some(Who::Enterprise { .. }) => {
            return super::message_page(
                console.who(&headers).await.as_ref(),
                axum::http::StatusCode::NOT_FOUND,
                "Not found",
                "There is no such page.".to_owned(),
            );
        }
        None => return Redirect::to("/console").into_response(),
    };
    let month = query
        .month
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| super::enterprise::this_month(&console));
    let carriers = match console
        .admin
        .get_carrier_stats(who.request(pb::GetCarrierStatsRequest::default()))
        .await
    {
        Ok(stats) => stats.into_inner().carriers,
        Err(status) => return refused(&who, &status),
    };
    let findings = match console
        .admin
        .reconcile(who.request(pb::ReconcileRequest::default()))
        .await
    {
        Ok(rows) => rows
            .into_inner()
            .rows
            .into_iter()
            .map(|r| {
                (
                    r.carrier_id,
                    r.message_id,
                    r.counted_delivered,
                    r.reported_sent,
                    r.counted_opened,
                    r.reported_opened,
                    r.finding,
                )
            })
            .collect(),
        Err(status) => return refused(&who, &status),
    };
    let revenue = match console
        .admin
        .get_revenue(who.request(pb::GetRevenueRequest {
            month: month.clone(),
            by: vec![
                pb::RevenueDimension::Carrier as i32,
                pb::RevenueDimension::Channel as i32,
            ],
        }))
        .await
    {
        Ok(revenue) => revenue.into_inner(),
        Err(status) => return refused(&who, &status),
    };
    render(OperatorPage {
        nav: Nav::of(Some(&who)),
        month,
        carriers,
        findings,
        revenue_columns: revenue.columns,
        revenue: revenue
            .rows
            .into_iter()
            .map(|r| (r.key, r.quantity, r.amount))
            .collect(),
        revenue_total: revenue.total,
    })
}
