//! The capacity auction, pure: the pricing rule, sealed bids, and how a
//! closed slot's capacity is allocated and paid for.
//!
//! Capacity goes to bids in descending price order, earlier bids first on
//! equal prices; the last winner may be filled in part. Pay-as-bid winners
//! pay their own price; under the uniform rule every winner pays the highest
//! price left unfilled (a losing bid, or the unfilled part of the last
//! winner's), or the reserve when every bid was filled. Money is integer yen.
//! `storage::auction` keeps slots and bids and runs the close in one
//! transaction; this module never reads storage.

use crate::error::{Error, Result};
use crate::policy::WindowMode;
use crate::pricing::Yen;
use crate::targeting::{Channel, NewMessage};
use chukei_proto::window::Window;

/// How winners pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Each winner pays its own bid.
    PayAsBid,
    /// Every winner pays the highest losing price (or the reserve).
    Uniform,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PayAsBid => "pay_as_bid",
            Self::Uniform => "uniform",
        }
    }

    pub fn parse(stored: &str) -> Option<Self> {
        match stored {
            "pay_as_bid" => Some(Self::PayAsBid),
            "uniform" => Some(Self::Uniform),
            _ => None,
        }
    }
}

/// A sealed bid, as the close sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedBid {
    pub bid_id: String,
    /// Order of placement in its slot.
    pub seq: i64,
    pub quantity: i64,
    pub price: Yen,
}

/// One bid's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Award {
    pub bid_id: String,
    /// Messages won (0: lost).
    pub quantity: i64,
    /// Yen per message the winner pays (0 for a loser).
    pub pays: Yen,
}

/// A closed slot's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// In the order capacity was given out (price desc, then placement).
    pub awards: Vec<Award>,
    pub awarded: i64,
    /// The uniform price, or the lowest winning bid under pay-as-bid (`None`: no winner).
    pub clearing_price: Option<Yen>,
}

/// Allocates `capacity` messages among `bids` (each at or above `reserve`
/// when placed) by `rule`.
pub fn allocate(bids: &[SealedBid], capacity: i64, reserve: Yen, rule: Rule) -> Allocation {
    let mut order: Vec<&SealedBid> = bids.iter().collect();
    order.sort_by(|a, b| b.price.cmp(&a.price).then(a.seq.cmp(&b.seq)));
    let mut left = capacity.max(0);
    let mut filled = Vec::with_capacity(order.len());
    // The highest price of any unit that went unfilled.
    let mut highest_unfilled: Option<Yen> = None;
    for bid in &order {
        let quantity = if bid.price >= reserve {
            bid.quantity.min(left)
        } else {
            0
        };
        left -= quantity;
        if quantity < bid.quantity {
            highest_unfilled = Some(highest_unfilled.map_or(bid.price, |p| p.max(bid.price)));
        }
        filled.push((*bid, quantity));
    }
    let uniform = highest_unfilled.unwrap_or(0).max(reserve);
    let awards: Vec<Award> = filled
        .iter()
        .map(|(bid, quantity)| Award {
            bid_id: bid.bid_id.clone(),
            quantity: *quantity,
            pays: match (*quantity, rule) {
                (0, _) => 0,
                (_, Rule::PayAsBid) => bid.price,
                (_, Rule::Uniform) => uniform,
            },
        })
        .collect();
    let awarded = awards.iter().map(|a| a.quantity).sum();
    let lowest_winner = filled
        .iter()
        .filter(|(_, q)| *q > 0)
        .map(|(b, _)| b.price)
        .min();
    Allocation {
        awards,
        awarded,
        clearing_price: lowest_winner.map(|lowest| match rule {
            Rule::PayAsBid => lowest,
            Rule::Uniform => uniform,
        }),
    }
}

/// A slot as the operator opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSlot {
    pub channel: Channel,
    pub starts_at: i64,
    pub ends_at: i64,
    pub capacity: i64,
    pub closes_at: i64,
    pub reserve: Yen,
    pub rule: Rule,
}

/// A slot and where its auction stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    pub slot_id: String,
    pub slot: NewSlot,
    pub closed: bool,
    pub bids: i64,
    pub awarded: i64,
    pub clearing_price: Option<Yen>,
}

/// Where a bid stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BidState {
    Sealed,
    Won,
    Lost,
}

/// One of an enterprise's bids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BidRow {
    pub bid_id: String,
    pub slot_id: String,
    pub quantity: i64,
    pub price: Yen,
    pub placed_at: i64,
    pub state: BidState,
    pub awarded: i64,
    pub pays: Yen,
    pub used: i64,
    /// The slot's channel and time window.
    pub channel: Channel,
    pub starts_at: i64,
    pub ends_at: i64,
}

/// What to do with a message sent without a bid whose first send falls in a
/// slot sold by auction (operator setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unbid {
    /// Refuse it: send with a winning bid id, or later.
    Refuse,
    /// Hold it until the slot ends.
    Defer,
}

/// How the auction shapes one message: sent on a winning bid (its slot's
/// channel and window, capacity drawn at acceptance), or deferred past slots
/// sold by auction. The message's own fields (and so its idempotency
/// fingerprint) stay as the enterprise sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Terms {
    /// The winning bid the message draws on.
    pub bid_id: Option<String>,
    /// Replaces the message's window.
    pub window: Option<Window>,
    /// The channel when the message named none.
    pub channel: Option<Channel>,
    /// Caps the message's expiry.
    pub expires_by: Option<i64>,
    /// In words, for the plan.
    pub note: Option<String>,
}

/// The terms of a message sent with winning bid `bid` (`None`: no such bid
/// of this enterprise) at `now`.
pub fn terms_for_bid(message: &NewMessage, bid: Option<&BidRow>, now: i64) -> Result<Terms> {
    let bid = bid.ok_or_else(|| Error::not_found("bid_id", "no such winning bid"))?;
    match bid.state {
        BidState::Sealed => {
            return Err(Error::refused("bid_id", "the auction has not closed yet"));
        }
        BidState::Lost => return Err(Error::refused("bid_id", "this bid did not win")),
        BidState::Won => {}
    }
    if now >= bid.ends_at {
        return Err(Error::refused("bid_id", "the bid's slot has ended"));
    }
    let channels = &message.policy.channels;
    let on_slot_channel = channels.is_empty() || channels.as_slice() == [bid.channel];
    if message.policy.kind != crate::policy::PolicyKind::Fixed || !on_slot_channel {
        return Err(Error::invalid(
            "channel",
            format!(
                "a winning bid's messages go on its slot's channel ({}) with the fixed policy",
                crate::policy::channel_name(Some(bid.channel))
            ),
        ));
    }
    if message.timing.window.is_some() || message.timing.mode == WindowMode::AtCarrier {
        return Err(Error::invalid(
            "window",
            "a winning bid's messages go in its slot's window",
        ));
    }
    if message.timing.send_time.is_some() {
        return Err(Error::invalid(
            "send_time",
            "a winning bid's messages go in its slot's window",
        ));
    }
    let window = Window::absolute(bid.starts_at, bid.ends_at)
        .map_err(|reason| Error::Internal(anyhow::anyhow!(reason)))?;
    Ok(Terms {
        bid_id: Some(bid.bid_id.clone()),
        window: Some(window),
        channel: Some(bid.channel),
        expires_by: Some(bid.ends_at),
        note: Some(format!(
            "winning bid {} ({} messages)",
            bid.bid_id, bid.awarded
        )),
    })
}

/// The terms of a message sent without a bid at `now` (expiring at
/// `expires_at`), given the auction `slots` of its channels: untouched
/// unless its first send falls in one of them; then refused, or deferred to
/// the end of the slot(s) when `unbid` says so and the message has no
/// timing of its own.
pub fn terms_without_bid(
    message: &NewMessage,
    slots: &[SlotRow],
    now: i64,
    expires_at: i64,
    unbid: Unbid,
) -> Result<Terms> {
    let first_send = |window: Option<&Window>| match window {
        Some(window) => window.opening(now).map(|(open, _)| open.max(now)),
        None => Some(now),
    };
    let blocking = |at: i64| {
        slots
            .iter()
            .find(|s| s.slot.starts_at <= at && at < s.slot.ends_at)
    };
    let Some(first) = first_send(message.timing.window.as_ref()) else {
        return Ok(Terms::default());
    };
    let Some(slot) = blocking(first) else {
        return Ok(Terms::default());
    };
    let sold = || {
        format!(
            "{} capacity is sold by auction until {} (slot {}): send with a winning bid_id, or after it",
            crate::policy::channel_name(Some(slot.slot.channel)),
            chukei_proto::clock::rfc3339(slot.slot.ends_at),
            slot.slot_id
        )
    };
    let own_timing = message.timing.window.is_some() || message.timing.send_time.is_some();
    if unbid == Unbid::Refuse || own_timing {
        return Err(Error::refused("bid_id", sold()));
    }
    // Deferred: past this slot and any slot that starts as it ends.
    let mut until = slot.slot.ends_at;
    while let Some(next) = blocking(until) {
        until = next.slot.ends_at;
    }
    if until >= expires_at {
        return Err(Error::refused(
            "bid_id",
            format!("{}; the message expires first", sold()),
        ));
    }
    let window = Window::absolute(until, expires_at)
        .map_err(|reason| Error::Internal(anyhow::anyhow!(reason)))?;
    Ok(Terms {
        window: Some(window),
        note: Some(format!(
            "deferred to {}: capacity before it is sold by auction",
            chukei_proto::clock::rfc3339(until)
        )),
        ..Terms::default()
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn bid(id: &str, seq: i64, quantity: i64, price: Yen) -> SealedBid {
        SealedBid {
            bid_id: id.to_owned(),
            seq,
            quantity,
            price,
        }
    }

    fn outcome(allocation: &Allocation) -> Vec<(&str, i64, Yen)> {
        allocation
            .awards
            .iter()
            .map(|a| (a.bid_id.as_str(), a.quantity, a.pays))
            .collect()
    }

    /// Worked example: 100 messages; A 60 @ 12, B 50 @ 10, C 30 @ 15, D 20 @ 10 (after B).
    /// By price: C 30 @ 15, A 60 @ 12, then B (earlier than D) gets the last 10 of its 50; D nothing.
    fn example() -> Vec<SealedBid> {
        vec![
            bid("A", 1, 60, 12),
            bid("B", 2, 50, 10),
            bid("C", 3, 30, 15),
            bid("D", 4, 20, 10),
        ]
    }

    #[test]
    fn pay_as_bid_worked_example() {
        let allocation = allocate(&example(), 100, 0, Rule::PayAsBid);
        assert_eq!(
            outcome(&allocation),
            vec![("C", 30, 15), ("A", 60, 12), ("B", 10, 10), ("D", 0, 0)]
        );
        assert_eq!(allocation.awarded, 100);
        assert_eq!(allocation.clearing_price, Some(10));
        // Revenue: 30×15 + 60×12 + 10×10 = 1,270.
        let revenue: i64 = allocation.awards.iter().map(|a| a.quantity * a.pays).sum();
        assert_eq!(revenue, 1_270);
    }

    #[test]
    fn uniform_worked_example() {
        // Highest unfilled price: B's remaining 40 (and D) at 10 → everyone pays 10.
        let allocation = allocate(&example(), 100, 0, Rule::Uniform);
        assert_eq!(
            outcome(&allocation),
            vec![("C", 30, 10), ("A", 60, 10), ("B", 10, 10), ("D", 0, 0)]
        );
        assert_eq!(allocation.clearing_price, Some(10));

        // 90 messages: C 30, A 60 → B and D lose entirely; the highest losing bid is 10.
        let allocation = allocate(&example(), 90, 0, Rule::Uniform);
        assert_eq!(
            outcome(&allocation),
            vec![("C", 30, 10), ("A", 60, 10), ("B", 0, 0), ("D", 0, 0)]
        );

        // 80 messages: A is filled in part, so its own unfilled units set the price (12).
        let allocation = allocate(&example(), 80, 0, Rule::Uniform);
        assert_eq!(
            outcome(&allocation),
            vec![("C", 30, 12), ("A", 50, 12), ("B", 0, 0), ("D", 0, 0)]
        );
    }

    #[test]
    fn reserve_sets_the_floor_and_excludes_lower_bids() {
        // Capacity to spare: every bid at or above the reserve is filled at the reserve.
        let bids = vec![bid("A", 1, 10, 20), bid("B", 2, 10, 8), bid("C", 3, 10, 11)];
        let allocation = allocate(&bids, 100, 9, Rule::Uniform);
        assert_eq!(
            outcome(&allocation),
            vec![("A", 10, 9), ("C", 10, 9), ("B", 0, 0)]
        );
        assert_eq!(allocation.clearing_price, Some(9));
        let allocation = allocate(&bids, 100, 0, Rule::Uniform);
        assert_eq!(allocation.clearing_price, Some(0));
        let allocation = allocate(&bids, 100, 9, Rule::PayAsBid);
        assert_eq!(
            outcome(&allocation),
            vec![("A", 10, 20), ("C", 10, 11), ("B", 0, 0)]
        );
        assert_eq!(allocation.clearing_price, Some(11));
    }

    #[test]
    fn ties_go_to_the_earlier_bid() {
        let bids = vec![bid("late", 2, 10, 10), bid("early", 1, 10, 10)];
        let allocation = allocate(&bids, 15, 0, Rule::PayAsBid);
        assert_eq!(
            outcome(&allocation),
            vec![("early", 10, 10), ("late", 5, 10)]
        );
        assert!(allocate(&[], 15, 0, Rule::Uniform).clearing_price.is_none());
    }

    fn slot(id: &str, starts_at: i64, ends_at: i64) -> SlotRow {
        SlotRow {
            slot_id: id.to_owned(),
            slot: NewSlot {
                channel: Channel::Sms,
                starts_at,
                ends_at,
                capacity: 10,
                closes_at: 0,
                reserve: 0,
                rule: Rule::Uniform,
            },
            closed: true,
            bids: 0,
            awarded: 0,
            clearing_price: None,
        }
    }

    fn unbid_message(window: Option<Window>) -> NewMessage {
        NewMessage {
            idempotency_key: "k".into(),
            target: crate::targeting::Target::AllRegistered,
            content: crate::targeting::Content {
                text: "hi".into(),
                ..Default::default()
            },
            policy: crate::policy::Policy::fixed(Some(Channel::Sms)),
            all_carriers: false,
            timing: crate::policy::Timing {
                window,
                ..Default::default()
            },
            follow_up: None,
            priority: crate::policy::Priority::Normal,
            bid_id: None,
            trace_parent: String::new(),
        }
    }

    #[test]
    fn messages_without_a_bid_are_refused_or_deferred_past_sold_slots() {
        // Slots 100–200 and 200–300 back to back; 500–600 later.
        let slots = [
            slot("a", 100, 200),
            slot("b", 200, 300),
            slot("c", 500, 600),
        ];
        let message = unbid_message(None);
        // Before or after the slots: untouched.
        assert_eq!(
            terms_without_bid(&message, &slots, 50, 1_000, Unbid::Refuse).unwrap(),
            Terms::default()
        );
        assert_eq!(
            terms_without_bid(&message, &slots, 300, 1_000, Unbid::Refuse).unwrap(),
            Terms::default()
        );
        // Inside: refused, naming the slot…
        let refused = terms_without_bid(&message, &slots, 150, 1_000, Unbid::Refuse).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("bid_id: SMS capacity is sold by auction"),
            "{refused}"
        );
        assert!(refused.to_string().contains("(slot a)"), "{refused}");
        // …or deferred past both adjoining slots, up to the expiry.
        let deferred = terms_without_bid(&message, &slots, 150, 1_000, Unbid::Defer).unwrap();
        assert_eq!(deferred.window, Some(Window::absolute(300, 1_000).unwrap()));
        assert!(terms_without_bid(&message, &slots, 150, 250, Unbid::Defer).is_err());
        // A message with its own window is never moved: refused when it opens in a slot.
        let windowed = unbid_message(Some(Window::absolute(520, 540).unwrap()));
        assert!(terms_without_bid(&windowed, &slots, 150, 1_000, Unbid::Defer).is_err());
        let clear = unbid_message(Some(Window::absolute(320, 340).unwrap()));
        assert_eq!(
            terms_without_bid(&clear, &slots, 150, 1_000, Unbid::Defer).unwrap(),
            Terms::default()
        );
    }

    fn bids() -> impl Strategy<Value = Vec<SealedBid>> {
        prop::collection::vec((1i64..50, 1i64..30), 0..20).prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (quantity, price))| bid(&format!("b{i}"), i as i64, quantity, price))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn allocations_never_oversell_and_respect_price_order(
            bids in bids(),
            capacity in 0i64..300,
            reserve in 0i64..15,
        ) {
            for rule in [Rule::PayAsBid, Rule::Uniform] {
                let allocation = allocate(&bids, capacity, reserve, rule);
                prop_assert!(allocation.awarded <= capacity);
                let by_id = |id: &str| bids.iter().find(|b| b.bid_id == id).unwrap();
                for award in &allocation.awards {
                    let bid = by_id(&award.bid_id);
                    prop_assert!(award.quantity <= bid.quantity);
                    if award.quantity > 0 {
                        // Nobody pays more than they bid, or less than the reserve.
                        prop_assert!(award.pays <= bid.price && award.pays >= reserve);
                    }
                }
                // A bid that got less than it asked for (at or above the
                // reserve) means everything after it got nothing: capacity
                // ran out, so no cheaper or later bid was served before it.
                let mut starved = false;
                for award in &allocation.awards {
                    let bid = by_id(&award.bid_id);
                    if bid.price < reserve {
                        continue;
                    }
                    if starved {
                        prop_assert_eq!(award.quantity, 0);
                    }
                    if award.quantity < bid.quantity {
                        starved = true;
                    }
                }
                // Capacity is only left over when every eligible bid was filled.
                let eligible: i64 = bids.iter().filter(|b| b.price >= reserve).map(|b| b.quantity).sum();
                prop_assert_eq!(allocation.awarded, eligible.min(capacity));
            }
        }
    }
}
