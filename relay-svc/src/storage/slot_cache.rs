//! The auction slots not yet ended, kept a moment, so that `SendMessage` —
//! which checks whether its channel's capacity is sold by auction when the
//! message goes — does not read `auction_slots` on every call (one read per
//! message, on a read connection: at 7,000 targeted messages a second,
//! about a tenth of a core).
//!
//! A slot opened on this replica empties the cache in the same call;
//! another replica's reaches it within [`SLOT_CACHE_TTL`], after which the
//! slots are read again. A slot's auction can only sell a window that
//! starts after it closes, so the second matters only for a slot opened to
//! start at once. What a send checks — a slot's channel and window — does
//! not change once the slot is open.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auction::SlotRow;

/// How long the slots read are trusted: the most a slot opened on another
/// replica takes to bound this one's sends.
pub const SLOT_CACHE_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(crate) struct SlotCache {
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Bumped by every slot this replica opens: a read that began before
    /// it is not kept.
    generation: u64,
    slots: Option<Read>,
}

#[derive(Debug)]
struct Read {
    at: Instant,
    /// Every slot not ended at `now` (unix ms) when read.
    now: i64,
    slots: Arc<Vec<SlotRow>>,
}

impl SlotCache {
    /// The slots not ended at `now`, when they were read within the time
    /// to live (at or before `now`); `Err` with the generation to read them
    /// under otherwise.
    pub(crate) fn get(&self, now: i64) -> Result<Arc<Vec<SlotRow>>, u64> {
        let kept = self.kept.lock().expect("not poisoned");
        match &kept.slots {
            Some(read) if read.at.elapsed() < SLOT_CACHE_TTL && read.now <= now => {
                Ok(read.slots.clone())
            }
            _ => Err(kept.generation),
        }
    }

    /// Keeps `slots`, read at `now` under `generation`, unless a slot was
    /// opened since that read began.
    pub(crate) fn keep(&self, generation: u64, now: i64, slots: Vec<SlotRow>) -> Arc<Vec<SlotRow>> {
        let slots = Arc::new(slots);
        let mut kept = self.kept.lock().expect("not poisoned");
        if kept.generation == generation {
            kept.slots = Some(Read {
                at: Instant::now(),
                now,
                slots: slots.clone(),
            });
        }
        slots
    }

    /// A slot was opened here: read them again.
    pub(crate) fn forget(&self) {
        let mut kept = self.kept.lock().expect("not poisoned");
        kept.generation += 1;
        kept.slots = None;
    }
}

#[cfg(test)]
mod tests {
    use super::SLOT_CACHE_TTL;
    use crate::auction::{NewSlot, Rule};
    use crate::storage::Store;
    use crate::targeting::Channel;

    /// Two replicas on one database: a slot opened on one bounds that
    /// one's sends at once, and the other's within the time to live.
    #[tokio::test]
    async fn a_slot_counts_at_once_here_and_within_the_ttl_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("relay.db").display());
        let here = Store::connect(&url).await.unwrap();
        let elsewhere = Store::connect(&url).await.unwrap();
        let now = 1_795_651_200_000;
        let slot = |starts_at: i64| NewSlot {
            channel: Channel::Sms,
            starts_at,
            ends_at: starts_at + 3_600_000,
            capacity: 10,
            closes_at: now,
            reserve: 0,
            rule: Rule::PayAsBid,
        };
        let seen = |store: &Store| {
            let store = store.clone();
            async move {
                let slots = store
                    .slots_for_send(&[], now, now + 86_400_000)
                    .await
                    .unwrap();
                slots.into_iter().map(|s| s.slot_id).collect::<Vec<_>>()
            }
        };
        assert!(seen(&here).await.is_empty());
        assert!(seen(&elsewhere).await.is_empty());

        here.open_slot("s_here", &slot(now + 60_000), now)
            .await
            .unwrap();
        assert_eq!(seen(&here).await, ["s_here"], "opened here: at once");
        elsewhere
            .open_slot("s_elsewhere", &slot(now + 7_200_000), now)
            .await
            .unwrap();
        assert_eq!(
            seen(&here).await,
            ["s_here"],
            "opened elsewhere: read lately"
        );
        tokio::time::sleep(SLOT_CACHE_TTL + std::time::Duration::from_millis(100)).await;
        assert_eq!(
            seen(&here).await,
            ["s_here", "s_elsewhere"],
            "after the time to live"
        );
        // Only slots of the send's channels, and not those ended by then.
        let later = here
            .slots_for_send(&[Channel::Email], now, now + 86_400_000)
            .await
            .unwrap();
        assert!(later.is_empty());
        let after_both = here
            .slots_for_send(&[], now + 7_200_000 + 3_600_000, i64::MAX)
            .await
            .unwrap();
        assert!(after_both.is_empty());
    }
}
