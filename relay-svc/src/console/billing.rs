//! The enterprise's money: the monthly statement and the capacity auction
//! (slots, and placing a sealed bid).

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;
use serde::Deserialize;

use super::enterprise::this_month;
use super::enterprise::{channel_name, checked, enterprise, time};
use super::{Console, Nav, Who, refused, render};

#[derive(Template)]
#[template(path = "console/statement.html")]
struct StatementPage {
    nav: Nav,
    month: String,
    zone: String,
    lines: Vec<(String, &'static str, String, i64, i64, i64)>,
    total: i64,
}

#[derive(Deserialize)]
pub(super) struct MonthQuery {
    month: Option<String>,
}

pub(super) async fn statement(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(query): Query<MonthQuery>,
) -> Response {
    let who = match enterprise(&console, &headers).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    let month = query
        .month
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| this_month(&console));
    let statement = match console
        .api
        .get_statement(who.request(pb::GetStatementRequest {
            month: month.clone(),
        }))
        .await
    {
        Ok(statement) => statement.into_inner(),
        Err(status) => return refused(&who, &status),
    };
    render(StatementPage {
        nav: Nav::of(Some(&who)),
        month,
        zone: statement.zone,
        lines: statement
            .lines
            .iter()
            .map(|l| {
                (
                    l.kind.clone(),
                    channel_name(l.channel),
                    l.slot.map_or_else(String::new, |s| format!("{s:02}:00")),
                    l.quantity,
                    l.unit_price,
                    l.amount,
                )
            })
            .collect(),
        total: statement.total,
    })
}

struct SlotLine {
    slot_id: String,
    channel: &'static str,
    window: String,
    capacity: u64,
    closes: String,
    reserve: i64,
    status: String,
}

#[derive(Template)]
#[template(path = "console/auction.html")]
struct AuctionPage {
    nav: Nav,
    csrf: String,
    slots: Vec<SlotLine>,
    placed: Option<pb::Bid>,
    error: Option<String>,
}

async fn auction_page(
    console: &Console,
    who: &Who,
    placed: Option<pb::Bid>,
    error: Option<String>,
) -> Response {
    let slots = match console
        .api
        .list_auction_slots(who.request(pb::ListAuctionSlotsRequest {}))
        .await
    {
        Ok(slots) => slots.into_inner().slots,
        Err(status) => return refused(who, &status),
    };
    render(AuctionPage {
        nav: Nav::of(Some(who)),
        csrf: who.csrf(),
        slots: slots
            .into_iter()
            .map(|s| SlotLine {
                channel: channel_name(s.channel),
                window: format!(
                    "{} – {}",
                    time(s.starts_at.as_ref()),
                    time(s.ends_at.as_ref())
                ),
                capacity: s.capacity,
                closes: time(s.closes_at.as_ref()),
                reserve: s.reserve_price,
                status: if s.closed {
                    match s.clearing_price {
                        Some(price) => format!("closed: {} awarded at ¥{price}", s.awarded),
                        None => "closed: nothing awarded".to_owned(),
                    }
                } else {
                    "open for bids".to_owned()
                },
                slot_id: s.slot_id,
            })
            .collect(),
        placed,
        error,
    })
}

pub(super) async fn auction(State(console): State<Console>, headers: HeaderMap) -> Response {
    match enterprise(&console, &headers).await {
        Ok(who) => auction_page(&console, &who, None, None).await,
        Err(response) => *response,
    }
}

#[derive(Deserialize)]
pub(super) struct BidForm {
    slot_id: String,
    quantity: String,
    price: String,
    csrf: String,
}

pub(super) async fn bid(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<BidForm>,
) -> Response {
    let who = match checked(&console, &headers, &form.csrf).await {
        Ok(who) => who,
        Err(response) => return *response,
    };
    let (Ok(quantity), Ok(price)) = (form.quantity.trim().parse(), form.price.trim().parse())
    else {
        return auction_page(
            &console,
            &who,
            None,
            Some("Quantity and price (yen): whole numbers".to_owned()),
        )
        .await;
    };
    match console
        .api
        .place_bid(who.request(pb::PlaceBidRequest {
            slot_id: form.slot_id,
            quantity,
            price,
        }))
        .await
    {
        Ok(bid) => auction_page(&console, &who, Some(bid.into_inner()), None).await,
        Err(status) => auction_page(&console, &who, None, Some(status.message().to_owned())).await,
    }
}
