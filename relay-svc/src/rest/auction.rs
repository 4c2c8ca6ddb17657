//! `/v1/auction`: the capacity auction's slots, and sealed bids on them.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chukei_proto::relay::v1 as pb;
use chukei_proto::relay::v1::enterprise_api_server::EnterpriseApi;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::wire;
use super::{Caller, Core, Problem};
use crate::content::Channel;

/// A slot of scarce send capacity, sold by sealed bids.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Slot {
    pub slot_id: String,
    pub channel: Option<Channel>,
    pub starts_at: Option<String>,
    pub ends_at: Option<String>,
    /// Messages the slot can carry.
    pub capacity: u64,
    /// Bids are taken until then.
    pub closes_at: Option<String>,
    /// Yen per message, the least a bid may offer.
    pub reserve_price: i64,
    /// pay_as_bid or uniform.
    pub rule: String,
    pub closed: bool,
    pub awarded: u64,
    pub clearing_price: Option<i64>,
    pub bids: u64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Slots {
    pub slots: Vec<Slot>,
}

/// Slots open for bids, and recently closed ones with their clearing prices.
#[utoipa::path(get, path = "/v1/auction/slots", tag = "auction", responses((status = 200, body = Slots)))]
pub(super) async fn slots(
    State(core): State<Core>,
    caller: Caller,
) -> Result<Json<Slots>, Problem> {
    let list = core
        .api
        .list_auction_slots(caller.request(pb::ListAuctionSlotsRequest {}))
        .await?
        .into_inner();
    Ok(Json(Slots {
        slots: list
            .slots
            .into_iter()
            .map(|s| Slot {
                channel: wire::channel(s.channel),
                starts_at: wire::instant(s.starts_at.as_ref()),
                ends_at: wire::instant(s.ends_at.as_ref()),
                closes_at: wire::instant(s.closes_at.as_ref()),
                rule: match pb::PricingRule::try_from(s.rule) {
                    Ok(pb::PricingRule::Uniform) => "uniform",
                    _ => "pay_as_bid",
                }
                .to_owned(),
                slot_id: s.slot_id,
                capacity: s.capacity,
                reserve_price: s.reserve_price,
                closed: s.closed,
                awarded: s.awarded,
                clearing_price: s.clearing_price,
                bids: s.bids,
            })
            .collect(),
    }))
}

/// A sealed bid: `quantity` messages at `price` yen each.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BidBody {
    pub slot_id: String,
    pub quantity: u64,
    pub price: i64,
}

/// Where a bid stands.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Bid {
    /// Send with this id (`bid_id`) to draw on a won bid.
    pub bid_id: String,
    pub slot_id: String,
    pub quantity: u64,
    pub price: i64,
    pub placed_at: Option<String>,
    /// sealed, won or lost.
    pub state: String,
    pub awarded: u64,
    /// Yen per message the winner pays.
    pub pays: i64,
    pub used: u64,
    pub channel: Option<Channel>,
    pub starts_at: Option<String>,
    pub ends_at: Option<String>,
}

fn bid_from_wire(b: pb::Bid) -> Bid {
    Bid {
        state: match pb::BidState::try_from(b.state) {
            Ok(pb::BidState::Won) => "won",
            Ok(pb::BidState::Lost) => "lost",
            _ => "sealed",
        }
        .to_owned(),
        placed_at: wire::instant(b.placed_at.as_ref()),
        starts_at: wire::instant(b.starts_at.as_ref()),
        ends_at: wire::instant(b.ends_at.as_ref()),
        channel: wire::channel(b.channel),
        bid_id: b.bid_id,
        slot_id: b.slot_id,
        quantity: b.quantity,
        price: b.price,
        awarded: b.awarded,
        pays: b.pays,
        used: b.used,
    }
}

/// Places a sealed bid on an open slot.
#[utoipa::path(post, path = "/v1/auction/bids", tag = "auction", request_body = BidBody,
    responses((status = 201, body = Bid),
        (status = 400, description = "A field is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such slot", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The slot is closed", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn place_bid(
    State(core): State<Core>,
    caller: Caller,
    Json(body): Json<BidBody>,
) -> Result<(StatusCode, Json<Bid>), Problem> {
    let bid = core
        .api
        .place_bid(caller.request(pb::PlaceBidRequest {
            slot_id: body.slot_id,
            quantity: body.quantity,
            price: body.price,
        }))
        .await?
        .into_inner();
    Ok((StatusCode::CREATED, Json(bid_from_wire(bid))))
}

/// Where one of your bids stands (won: its capacity and what is left).
#[utoipa::path(get, path = "/v1/auction/bids/{bid_id}", tag = "auction",
    params(("bid_id" = String, Path)),
    responses((status = 200, body = Bid),
        (status = 404, description = "No such bid of yours", body = Problem, content_type = "application/problem+json")))]
pub(super) async fn bid(
    State(core): State<Core>,
    caller: Caller,
    Path(bid_id): Path<String>,
) -> Result<Json<Bid>, Problem> {
    let bid = core
        .api
        .get_bid(caller.request(pb::GetBidRequest { bid_id }))
        .await?
        .into_inner();
    Ok(Json(bid_from_wire(bid)))
}
