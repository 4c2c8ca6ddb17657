//! `auction slots|bid|status`: the capacity auction.

use anyhow::Result;
use chukei_proto::relay::v1 as pb;
use clap::Subcommand;

use crate::output::{print_bid, print_slots};
use crate::{Client, Out, explain};

#[derive(Subcommand, Debug)]
pub enum AuctionCommand {
    /// Slots open for bids, and recently closed ones with their clearing prices.
    Slots,
    /// Place a sealed bid: QUANTITY messages at PRICE yen each.
    Bid {
        slot_id: String,
        #[arg(long)]
        quantity: u64,
        /// Yen per message.
        #[arg(long)]
        price: i64,
    },
    /// Where one of your bids stands (won: its capacity and what is left).
    Status { bid_id: String },
}

impl AuctionCommand {
    pub(crate) async fn run(&self, client: &mut Client, json: bool, out: Out<'_>) -> Result<()> {
        match self {
            Self::Slots => {
                let slots = client
                    .list_auction_slots(pb::ListAuctionSlotsRequest {})
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_slots(&slots.slots, json, out)
            }
            Self::Bid {
                slot_id,
                quantity,
                price,
            } => {
                let bid = client
                    .place_bid(pb::PlaceBidRequest {
                        slot_id: slot_id.clone(),
                        quantity: *quantity,
                        price: *price,
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_bid(&bid, json, out)
            }
            Self::Status { bid_id } => {
                let bid = client
                    .get_bid(pb::GetBidRequest {
                        bid_id: bid_id.clone(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                print_bid(&bid, json, out)
            }
        }
    }
}
